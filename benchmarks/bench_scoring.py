"""Cases per second of the two-sided evaluation on SmolLM2: batched scorers vs one sequence at a time.

All variants score the same CounterFact cases in one process, interleaved over repeats, so their
ratio is meaningful on a shared machine even when absolute seconds are not:

- ``batched, shared prompt cache``: ``candidate_nll(method="cache")``, the default;
- ``batched, prompt+target``: ``method="concat"``, each (prompt, candidate) as its own row;
- ``one at a time``: ``method="concat", batch_size=1``, one forward per (prompt, candidate),
  as ROME-style loops do.

Every variant must give the same rows (max |difference| on the shared cases is reported).
Environment: ``BENCH_SCORING_CASES`` (default 10) cases for the batched variants, of which the
first ``BENCH_SCORING_LOOP_CASES`` (default 2) also go through the slow loop; ``BENCH_THREADS``
(default min(2, cores); use 1 on an oversubscribed machine, where OpenMP spinning makes 2 threads
several times slower than 1).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from core.io import atomic_write_json

log = logging.getLogger(__name__)

VARIANTS = (
    ("batched, shared prompt cache", {"method": "cache", "batch_size": 256}),
    ("batched, prompt+target", {"method": "concat", "batch_size": 64}),
    ("one at a time", {"method": "concat", "batch_size": 1}),
)


def _max_difference(rows_a: list[dict], rows_b: list[dict]) -> float:
    worst = 0.0
    for a, b in zip(rows_a, rows_b):
        for key, value in a.items():
            if isinstance(value, float) and isinstance(b.get(key), float):
                worst = max(worst, abs(value - b[key]))
    return worst


def main(args) -> dict:
    from facts.config import DatasetConfig
    from facts.load import load_facts
    from metrics.evaluation import evaluate_cases, evaluation_rows, prepare_cases
    from models.load import load_model

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", max(1, min(2, os.cpu_count() or 1)))))
    n_cases = int(os.environ.get("BENCH_SCORING_CASES", "10"))
    n_loop = min(n_cases, int(os.environ.get("BENCH_SCORING_LOOP_CASES", "2")))
    repeats = int(os.environ.get("BENCH_SCORING_REPEATS", "1"))
    loaded = load_model("smollm2_135m")
    facts = load_facts(DatasetConfig(name="counterfact", limit=n_cases))
    cases = prepare_cases(list(facts))
    evaluate_cases(loaded, cases[:1], progress=False)  # warm-up (allocator, kernels)
    seconds = {name: 0.0 for name, _ in VARIANTS}
    counts = {name: len(cases) if name != VARIANTS[-1][0] else n_loop for name, _ in VARIANTS}
    rows: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for name, options in VARIANTS:
            started = time.perf_counter()
            rows[name] = evaluation_rows(evaluate_cases(loaded, cases[: counts[name]], progress=False, **options))
            seconds[name] += time.perf_counter() - started
    baseline = VARIANTS[-1][0]
    rate = {name: repeats * counts[name] / seconds[name] for name, _ in VARIANTS}
    results = {
        "model": "smollm2_135m", "n_cases": len(cases), "n_loop_cases": n_loop, "repeats": repeats,
        "threads": torch.get_num_threads(),
        "variants": {
            name: {
                "cases": counts[name],
                "seconds_per_case": 1.0 / rate[name],
                "cases_per_second": rate[name],
                "speedup_vs_one_at_a_time": rate[name] / rate[baseline],
                "max_abs_difference_vs_one_at_a_time": _max_difference(rows[name], rows[baseline]),
                **options,
            }
            for name, options in VARIANTS
        },
    }
    lines = [f"{'variant':32s} {'cases/s':>9s} {'s/case':>8s} {'speedup':>8s} {'max|diff|':>10s}"]
    for name, row in results["variants"].items():
        lines.append(f"{name:32s} {row['cases_per_second']:9.3f} {row['seconds_per_case']:8.3f} "
                     f"{row['speedup_vs_one_at_a_time']:7.1f}x {row['max_abs_difference_vs_one_at_a_time']:10.2e}")
    log.info("evaluation scoring, SmolLM2-135M, %d cases (%d in the loop), %d threads\n%s", len(cases), n_loop,
             torch.get_num_threads(), "\n".join(lines))
    out = Path(getattr(args, "out", "outputs/bench"))
    atomic_write_json(out / "bench_scoring.json", results)
    return results


if __name__ == "__main__":
    import argparse

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="outputs/bench")
    main(parser.parse_args())
