"""Kill a real sweep with SIGKILL mid-run, rerun the same command: done jobs are skipped, the rest finish."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_kill_and_resume_sweep(tmp_path):
    env = {**os.environ, "KLOC_CACHE_DIR": str(tmp_path / "cache"), "WANDB_SILENT": "true"}
    # The converted embedded checkpoint (tokenizer of the tiny models) is shared, not recomputed.
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(ROOT / ".cache" / "models")
    cmd = [sys.executable, "-m", "pipeline.run", "-m", "stage=known", "dataset=counterfact", "dataset.limit=400",
           "model=tiny_gpt2,tiny_gptj,tiny_llama", "logger=none", f"paths.output_dir={tmp_path / 'out'}", "sweep_name=k"]
    sweep = tmp_path / "out" / "sweeps" / "k"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(sweep.glob("*/results.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/results.json")}
    assert 1 <= len(done_before) < 3, "the kill should land between the first and the last job"
    for path in sweep.rglob("*.json"):
        if not path.name.startswith(".tmp-"):
            json.loads(path.read_text())  # nothing half-written under a real name
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    markers = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/results.json")}
    assert len(markers) == 3
    assert all(markers[name] == stamp for name, stamp in done_before.items()), "finished jobs must be skipped"
    assert not list(sweep.glob("*/.tmp-*"))
    for job in sweep.glob("*/status.json"):
        assert json.loads(job.read_text())["status"] == "done"
