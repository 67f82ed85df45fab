"""The MEND editor: one forward/backward on the request, then the trained network's weight update.

The checkpoint comes from ``editor.checkpoint`` (a train_mend job dir or cache entry) or, when
that is null, from the cache by model identity (and ``editor.layers`` when set). The requests'
rewrites are teacher forced together (``rewrites: main``: the first rewrite only, as the authors'
MEND edits the sentence add_rel_prompt + " " + relation phrase in the relation perspective).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from editors.base import EditResult, Editor
from editors.config import MendConfig
from editors.deltas import WeightDeltas
from editors.ft import rewrite_pairs, target_batch
from editors.mend.checkpoint import find_checkpoint, load_checkpoint
from editors.mend.factors import gradient_factors, projection_names
from editors.mend.network import MendNetwork
from editors.requests import EditRequest
from models.load import LoadedModel

log = logging.getLogger(__name__)


class Mend(Editor):
    name = "mend"
    config: MendConfig

    def __init__(self, config: MendConfig, cache_dir=None, data_dir=None, network: MendNetwork | None = None) -> None:
        super().__init__(config, cache_dir, data_dir)
        self._networks: dict[str, tuple[MendNetwork, dict]] = {}
        self._given = network

    def network(self, loaded: LoadedModel) -> MendNetwork:
        """The checkpoint's network for this model (loaded once per model), or the one passed in."""
        if self._given is not None:
            return self._given
        key = repr(sorted(loaded.identity.items()))
        if key not in self._networks:
            path = self.config.checkpoint or find_checkpoint(self.cache_dir, loaded.identity, self.config.layers)
            network, meta = load_checkpoint(path, loaded, self.config.layers)
            log.info("mend: checkpoint %s (layers %s, %s steps)", path, network.layers, meta.get("summary", {}).get("steps"))
            self._networks[key] = (network, meta)
        return self._networks[key][0]

    def apply(self, loaded: LoadedModel, requests: Sequence[EditRequest]) -> EditResult:
        """As ``Editor.apply``, with the edited layers taken from the checkpoint."""
        return self.apply_read_only(loaded, requests)

    def compute(self, loaded: LoadedModel, requests: list[EditRequest]) -> tuple[WeightDeltas, list[dict[str, Any]]]:
        network = self.network(loaded)
        network.eval()
        layers = network.layers
        prompts, targets = rewrite_pairs(requests, self.config.rewrites)
        factors, inner_loss = gradient_factors(loaded, target_batch(loaded, prompts, targets), layers)
        with torch.no_grad():
            updates = network(factors)
        deltas = WeightDeltas.for_mlp_out(loaded.model, loaded.adapter, {layer: u.float() for layer, u in updates.items()})
        names = projection_names(loaded, layers)
        info = {"inner_loss": inner_loss, "tokens": int(next(iter(factors.values()))[0].shape[0]),
                "update_norms": {str(layer): float(updates[layer].norm()) for layer in layers},
                "edit_lrs": [float(x.detach()) for x in network.edit_lrs], "parameters": [names[layer] for layer in layers]}
        return deltas, [{"case_id": r.case_id, "request": r.describe(), **info} for r in requests]
