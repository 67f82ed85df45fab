"""Fact sharding with Lightning Fabric on the CPU: two processes give the same results as one."""

from __future__ import annotations

import functools

import pytest
import torch

from core.errors import ConfigError
from pipeline.distributed import FabricConfig, map_sharded, shard_indices

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "The mother tongue of Danielle Darrieux is",
    "Toko Yasuda, the",
    "Autonomous University of Madrid, which is located in",
    "What is the twin city of Lyon? It is",
    "The official religion of Edwin of Northumbria is",
    "Apple A5 was created by",
]


def next_token_logprobs(model_name: str, prompts: list[str], device: torch.device) -> list[list[float]]:
    """A real shard task: load a replica on ``device`` and score each prompt's top-3 next tokens."""
    from models import load_model
    from models.config import ModelConfig
    from pipeline.config import model_config_by_name

    cfg: ModelConfig = model_config_by_name(model_name)
    cfg.device = str(device)
    loaded = load_model(cfg)
    results = []
    for prompt in prompts:
        encoded = loaded.tokenizer(prompt, return_tensors="pt").to(loaded.device)
        with torch.no_grad():
            logprobs = loaded.model(**encoded).logits[0, -1].log_softmax(-1)
        results.append(logprobs.topk(3).values.tolist())
    return results


def test_shard_indices_cover_everything_once():
    shards = [shard_indices(10, rank, 3) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(10))


@pytest.mark.slow
def test_two_cpu_ranks_match_one_process():
    task = functools.partial(next_token_logprobs, "tiny_llama")
    single = map_sharded(task, PROMPTS, FabricConfig(accelerator="cpu", devices=1))
    sharded = map_sharded(task, PROMPTS, FabricConfig(accelerator="cpu", devices=2))
    assert len(sharded) == len(PROMPTS)
    torch.testing.assert_close(torch.tensor(sharded), torch.tensor(single), atol=1e-6, rtol=0)


def test_bad_device_count():
    with pytest.raises(ConfigError, match="fabric.devices"):
        map_sharded(lambda items, device: items, [1], FabricConfig(devices=0))
