"""Seconds per ROME edit and per MEMIT batch on SmolLM2 (CPU), with statistics and templates cached.

ROME: ``BENCH_EDIT_CASES`` (default 3) CounterFact entity edits through ``Rome.apply`` (keys,
KV-cached value optimisation, closed form), and the same value optimisations through
``editors.reference`` (full prompts and full logits every step, the authors' compute_v
structure), interleaved in one process: the ratio is meaningful on a shared machine even when
seconds are not; both reach the same target probabilities. MEMIT: one batch of
``BENCH_MEMIT_REQUESTS`` (default 100) requests. ``BENCH_THREADS`` (default 1: on an
oversubscribed 2-core machine OpenMP spinning makes 2 threads several times slower).
The SmolLM2 hyperparameters are read from conf/editor + conf/editor_model, as the pipeline does.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from core.io import atomic_write_json

log = logging.getLogger(__name__)


def main(args) -> dict:
    from editors import build_editor, entity_request
    from editors.reference import optimize_value_reference
    from facts.config import DatasetConfig
    from facts.load import load_facts
    from core.paths import default_cache_dir
    from models.load import load_model
    from pipeline.api import editor_config

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    n_cases = int(os.environ.get("BENCH_EDIT_CASES", "3"))
    n_memit = int(os.environ.get("BENCH_MEMIT_REQUESTS", "100"))
    cache_dir = default_cache_dir()
    loaded = load_model("smollm2_135m", cache_dir=cache_dir)
    facts = list(load_facts(DatasetConfig(name="counterfact", limit=max(n_cases, n_memit))))
    rome = build_editor(editor_config("rome", model="smollm2_135m"), cache_dir=cache_dir)
    layer = rome.config.layers[0]
    requests = [entity_request(fact) for fact in facts[:n_cases]]
    rome.apply(loaded, requests[:1]).restore()  # warm-up: statistics, inverse, templates
    contexts = rome.contexts(loaded)
    fast, slow, fast_prob, slow_prob = 0.0, 0.0, [], []
    for request in requests:
        started = time.perf_counter()
        with rome.apply(loaded, [request]) as result:
            pass
        fast += time.perf_counter() - started
        fast_prob.append(result.infos[0][f"layer_{layer}"]["target_prob"])
        started = time.perf_counter()
        value = optimize_value_reference(loaded, request, contexts, f"blocks.{layer}.mlp.hook_out", rome.config.value_settings())
        slow += time.perf_counter() - started
        slow_prob.append(value.target_prob)
    memit = build_editor(editor_config("memit", model="smollm2_135m"), cache_dir=cache_dir)
    memit_requests = [entity_request(fact) for fact in facts[:n_memit]]
    memit.apply(loaded, memit_requests[:1]).restore()  # warm-up: statistics, templates
    started = time.perf_counter()
    with memit.apply(loaded, memit_requests) as batch:
        pass
    memit_seconds = time.perf_counter() - started
    results = {
        "model": "smollm2_135m", "threads": torch.get_num_threads(), "rome_layer": layer, "rome_cases": len(requests),
        "rome_seconds_per_edit": fast / len(requests),
        "reference_value_seconds_per_edit": slow / len(requests),
        "speedup_vs_reference_value_optimisation": slow / fast,
        "rome_target_prob": sum(fast_prob) / len(fast_prob), "reference_target_prob": sum(slow_prob) / len(slow_prob),
        "memit_layers": list(memit.config.layers), "memit_requests": len(memit_requests),
        "memit_seconds_per_batch": memit_seconds, "memit_seconds_per_request": memit_seconds / len(memit_requests),
        "memit_mean_target_prob": sum(i["target_prob"] for i in batch.infos) / len(batch.infos),
    }
    for key, value in results.items():
        log.info("%-42s %s", key, f"{value:.3f}" if isinstance(value, float) else value)
    atomic_write_json(Path(args.out) / "bench_editing.json", results)
    return results
