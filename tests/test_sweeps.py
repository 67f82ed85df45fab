"""The paper's sweep line as written, on a tiny model: four full jobs (trace + edit + both-sided
scores), the trace of a perspective computed once per sweep, skipped on rerun, recomputed with force."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_known_user_facts

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["stage.edit.n_cases=2", "stage.edit.n_resamples=50", "stage.edit.progress=false", "stage.trace.n_facts=2",
         "stage.trace.samples=2", "stage.trace.window=2", "stage.trace.n_bootstrap=50", "stage.trace.plot_facts=1",
         "stage.trace.progress=false"]


@pytest.mark.slow
def test_editor_perspective_sweep(tmp_path, tiny_gpt2):
    facts = tmp_path / "known.jsonl"
    write_known_user_facts(tiny_gpt2, facts)
    # A fresh trace cache (the converted checkpoints are shared) so the first job must compute each trace.
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(ROOT / ".cache" / "models")
    env = {**os.environ, "KLOC_CACHE_DIR": str(tmp_path / "cache"), "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "pipeline.run", "-m", "editor=rome,memit", "perspective=entity,relation",
           "model=tiny_gpt2", *SMALL, "stage.trace_dataset.name=user", f"stage.trace_dataset.path={facts}",
           f"paths.output_dir={tmp_path / 'out'}", "sweep_name=s"]

    def run(*extra: str) -> None:
        done = subprocess.run([*cmd, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]

    run()
    markers = sorted((tmp_path / "out" / "sweeps" / "s").glob("*/results.json"))
    assert [m.parent.name.split(",")[:3] for m in markers] == [
        ["editor=memit", "model=tiny_gpt2", "perspective=entity"], ["editor=memit", "model=tiny_gpt2", "perspective=relation"],
        ["editor=rome", "model=tiny_gpt2", "perspective=entity"], ["editor=rome", "model=tiny_gpt2", "perspective=relation"],
    ]
    from_cache = {}
    for marker in markers:
        payload = json.loads(marker.read_text())
        assert payload["stage"] == "full"
        results = payload["results"]
        assert results["trace"]["n_traced"] == 2 and (marker.parent / "trace" / "aie.safetensors").exists()
        assert (marker.parent / "edit" / "cases.jsonl").exists() and not (marker.parent / "progress").exists()
        assert set(results["edit"]["post"]) >= {"entity.reliability", "relation.reliability"}
        from_cache[(results["editor"], results["perspective"])] = results["trace"]["n_from_cache"]
    # Per perspective, the first job computes the trace and the other editor's job reads all of it from the cache.
    for perspective in ("entity", "relation"):
        assert sorted(n for (_, p), n in from_cache.items() if p == perspective) == [0, 2]
    stamps = [m.stat().st_mtime_ns for m in markers]
    run()
    assert [m.stat().st_mtime_ns for m in markers] == stamps, "a rerun must skip finished jobs"
    run("force=true")
    assert all(m.stat().st_mtime_ns != s for m, s in zip(markers, stamps))


@pytest.mark.slow
def test_parallel_jobs_compute_a_shared_trace_once(tmp_path, tiny_gpt2):
    """Two jobs launched at once (submitit processes) need the same trace: the cache lock lets one compute it."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    facts = tmp_path / "known.jsonl"
    write_known_user_facts(tiny_gpt2, facts)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(ROOT / ".cache" / "models")
    env = {**os.environ, "KLOC_CACHE_DIR": str(tmp_path / "cache"), "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "pipeline.run", "-m", "hydra/launcher=local", "editor=rome,memit", "perspective=entity",
           "model=tiny_gpt2", *SMALL, "stage.trace_dataset.name=user", f"stage.trace_dataset.path={facts}", "logger=none",
           f"paths.output_dir={tmp_path / 'out'}", "sweep_name=p"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads(m.read_text())["results"] for m in (tmp_path / "out" / "sweeps" / "p").glob("*/results.json")]
    assert sorted(r["trace"]["n_from_cache"] for r in results) == [0, 2]
    entries = [p for p in (tmp_path / "cache" / "traces").iterdir() if p.is_dir()]
    assert len(entries) == 2, "one cache entry per fact, written once"


@pytest.mark.slow
def test_five_editor_sweep_joins_one_summary(tmp_path):
    """The paper's five-editor sweep line (stage=edit) on a tiny model, after MEND's training job."""
    env = {**os.environ, "KLOC_CACHE_DIR": str(ROOT / ".cache"), "WANDB_SILENT": "true"}
    common = ["model=tiny_gpt2", "logger=none", f"paths.output_dir={tmp_path}", "sweep_name=five"]

    def run(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "pipeline.run", *args, *common], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]

    run("stage=train_mend", "editor=mend", "stage.steps=4", "stage.val_every=2", "stage.n_val=2", "stage.progress=false")
    run("-m", "stage=edit", "editor=ft,kn,mend,rome,memit", "perspective=entity,relation", "stage.n_cases=2",
        "stage.n_resamples=20", "stage.progress=false")
    run("stage=summarize")
    summaries = list((tmp_path / "runs" / "five").glob("*stage=summarize*/summary.csv"))
    assert len(summaries) == 1
    import pandas as pd

    frame = pd.read_csv(summaries[0])
    assert set(frame["editor"]) == {"ft", "kn", "mend", "rome", "memit"}
    pairs = set(zip(frame["editor"], frame["perspective"]))
    assert len(pairs) == 10 and set(frame["side"]) == {"entity", "relation", "quality"}  # quality: fluency, NLL, collapse
    assert frame["n_collapsed"].notna().all()
