"""The paper's sweep line as written, on a tiny model: four jobs, skipped on rerun, recomputed with force."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_editor_perspective_sweep(tmp_path):
    env = {**os.environ, "KLOC_CACHE_DIR": str(ROOT / ".cache"), "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "pipeline.run", "-m", "editor=rome,memit", "perspective=entity,relation",
           "model=tiny_gpt2", "stage.n_cases=2", "stage.n_resamples=50", "stage.progress=false",
           f"paths.output_dir={tmp_path}", "sweep_name=s"]

    def run(*extra: str) -> None:
        done = subprocess.run([*cmd, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]

    run()
    markers = sorted((tmp_path / "sweeps" / "s").glob("*/results.json"))
    assert [m.parent.name for m in markers] == [
        "editor=memit,model=tiny_gpt2,perspective=entity,stage.n_cases=2,stage.n_resamples=50",
        "editor=memit,model=tiny_gpt2,perspective=relation,stage.n_cases=2,stage.n_resamples=50",
        "editor=rome,model=tiny_gpt2,perspective=entity,stage.n_cases=2,stage.n_resamples=50",
        "editor=rome,model=tiny_gpt2,perspective=relation,stage.n_cases=2,stage.n_resamples=50",
    ]
    for marker in markers:
        payload = json.loads(marker.read_text())
        assert payload["stage"] == "edit"
        assert (marker.parent / "cases.jsonl").exists()
    stamps = [m.stat().st_mtime_ns for m in markers]
    run()
    assert [m.stat().st_mtime_ns for m in markers] == stamps, "a rerun must skip finished jobs"
    run("force=true")
    assert all(m.stat().st_mtime_ns != s for m, s in zip(markers, stamps))
