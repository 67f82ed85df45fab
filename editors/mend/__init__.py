"""MEND (Mitchell et al., 2022): a gradient-decomposition hypernetwork per edited MLP projection.

    network, meta = load_checkpoint(path, loaded)           # or Mend(config) finds it in the cache
    with Mend(MendConfig(), cache_dir=".cache").apply(loaded, [entity_request(fact)]) as result:
        ...

Training: ``editors.mend.train.train_mend`` (Lightning Fabric), wrapped by ``stage=train_mend``.
"""

from editors.config import MendConfig, MendTrainConfig, NetworkConfig
from editors.mend.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, save_to_cache
from editors.mend.editor import Mend
from editors.mend.network import MendNetwork
from editors.mend.train import MendExample, TrainResult, examples_from_facts, examples_from_relation_requests, train_mend

__all__ = ["Mend", "MendConfig", "MendExample", "MendNetwork", "MendTrainConfig", "NetworkConfig", "TrainResult",
           "examples_from_facts", "examples_from_relation_requests", "find_checkpoint", "load_checkpoint", "save_checkpoint",
           "save_to_cache", "train_mend"]
