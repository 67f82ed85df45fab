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
    from models.config import model_config_by_name

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


def _fresh_cache(path):
    """A cache dir of its own (no traces yet) sharing only the converted tokenizer/model checkpoints."""
    import os
    from pathlib import Path

    path.mkdir()
    (path / "models").symlink_to(Path(os.environ.get("KLOC_CACHE_DIR", ".cache")).resolve() / "models")
    return f"paths.cache_dir={path}"


@pytest.mark.slow
def test_trace_and_evaluate_stages_sharded_over_two_cpu_ranks_match_one(compose_config, tiny_gpt2, tmp_path):
    """stage.fabric.devices=2 (two processes, a model replica each) writes the same AIE and rows as 1."""
    import json

    from helpers import write_known_user_facts
    from pipeline.jobs import run_job

    facts = tmp_path / "facts.jsonl"
    write_known_user_facts(tiny_gpt2, facts, n=3)
    trace = ["stage=trace", "model=tiny_gpt2", "dataset=user", f"dataset.path={facts}", "logger=none", "stage.samples=2",
             "stage.window=2", "stage.n_bootstrap=50", "stage.plot_facts=0", "stage.progress=false", "stage.severed=false",
             "stage.fabric.accelerator=cpu"]
    evaluate = ["stage=evaluate", "model=tiny_gpt2", "dataset=counterfact", "logger=none", "stage.n_cases=5",
                "stage.n_resamples=20", "stage.progress=false", "stage.fabric.accelerator=cpu"]
    outputs = {}
    for devices in (1, 2):
        cache = _fresh_cache(tmp_path / f"cache{devices}")
        summary = run_job(compose_config(*trace, f"stage.fabric.devices={devices}", cache), tmp_path / f"trace{devices}")["results"]
        assert summary["devices"] == devices and summary["n_traced"] == 3 and summary["n_from_cache"] == 0
        rows = [json.loads(line) for line in (tmp_path / f"trace{devices}" / "aie.jsonl").read_text().splitlines()]
        run_job(compose_config(*evaluate, f"stage.fabric.devices={devices}", cache), tmp_path / f"eval{devices}")
        cases = [json.loads(line) for line in (tmp_path / f"eval{devices}" / "cases.jsonl").read_text().splitlines()]
        outputs[devices] = (rows, cases)
    (rows1, cases1), (rows2, cases2) = outputs[1], outputs[2]
    assert [r["case_id"] for r in cases2] == [r["case_id"] for r in cases1]
    for a, b in zip(rows1, rows2):
        assert (a["name"], a["role"], a["layer"]) == (b["name"], b["role"], b["layer"])
        assert a["aie"] == pytest.approx(b["aie"], abs=1e-6, nan_ok=True)
    for a, b in zip(cases1, cases2):
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
            else:
                assert b[key] == value, key
