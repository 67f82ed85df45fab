"""The job wrapper: done-markers, skip on rerun, force, status on failure, W&B offline files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import ConfigError
from pipeline.jobs import run_job

ROOT = Path(__file__).resolve().parent.parent


def _known_cfg(compose_config, tmp_path, *extra):
    return compose_config("stage=known", "model=tiny_gpt2", "dataset=known", "dataset.limit=12", "logger=none",
                          f"paths.cache_dir={tmp_path / 'cache'}", *extra)


def test_known_stage_writes_results_and_skips_rerun(compose_config, tmp_path):
    cfg = _known_cfg(compose_config, tmp_path)
    job_dir = tmp_path / "job"
    first = run_job(cfg, job_dir)
    assert first["results"]["n_facts"] == 12
    assert json.loads((job_dir / "status.json").read_text())["status"] == "done"
    assert (job_dir / "config.yaml").exists() and (job_dir / "knowledge.jsonl").exists()
    stamp = (job_dir / "results.json").stat().st_mtime_ns
    again = run_job(cfg, job_dir)
    assert again == first and (job_dir / "results.json").stat().st_mtime_ns == stamp
    forced = run_job(_known_cfg(compose_config, tmp_path, "force=true"), job_dir)
    assert forced["results"]["from_cache"] is True  # the knowledge cache is reused, the job recomputed
    assert (job_dir / "results.json").stat().st_mtime_ns != stamp


def test_failed_job_records_error_and_leaves_no_marker(compose_config, tmp_path):
    cfg = _known_cfg(compose_config, tmp_path, "model.dtype=float8")
    with pytest.raises(ConfigError):
        run_job(cfg, tmp_path / "job")
    status = json.loads((tmp_path / "job" / "status.json").read_text())
    assert status["status"] == "failed"
    assert status["error"]["key"] == "model.dtype" and "float32" in status["error"]["hint"]
    assert not (tmp_path / "job" / "results.json").exists()


def test_wandb_offline_run_files_in_job_dir(compose_config, tmp_path):
    cfg = _known_cfg(compose_config, tmp_path, "logger=wandb")
    run_job(cfg, tmp_path / "job", job_name="stage=known")
    runs = list((tmp_path / "job" / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run in the job dir"
    assert any(p.suffix == ".wandb" for p in runs[0].iterdir())


@pytest.mark.slow
def test_cli_multirun_skips_done_jobs_and_force_recomputes(tmp_path):
    env = {**os.environ, "KLOC_CACHE_DIR": str(ROOT / ".cache"), "WANDB_SILENT": "true"}
    base = [sys.executable, "-m", "pipeline.run", "-m", "stage=known", "dataset=known", "dataset.limit=8",
            "model=tiny_gpt2,tiny_llama", "logger=none", f"paths.output_dir={tmp_path}", "sweep_name=t"]

    def run(*extra: str) -> str:
        done = subprocess.run([*base, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr + done.stdout

    run()
    markers = sorted((tmp_path / "sweeps" / "t").glob("*/results.json"))
    assert [m.parent.name for m in markers] == ["dataset.limit=8,dataset=known,model=tiny_gpt2,stage=known",
                                                "dataset.limit=8,dataset=known,model=tiny_llama,stage=known"]
    stamps = [m.stat().st_mtime_ns for m in markers]
    assert "skipping" in run()
    assert [m.stat().st_mtime_ns for m in markers] == stamps
    run("force=true")
    assert all(m.stat().st_mtime_ns != s for m, s in zip(markers, stamps))


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_same_jobs(tmp_path):
    """The cluster code path (submitit) on this machine: same job dirs, same done-markers."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = {**os.environ, "KLOC_CACHE_DIR": str(ROOT / ".cache"), "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "pipeline.run", "-m", "hydra/launcher=local", "stage=known", "dataset=known",
           "dataset.limit=4", "model=tiny_gpt2,tiny_gptj", "logger=none", f"paths.output_dir={tmp_path}", "sweep_name=s"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "sweeps" / "s").glob("*/results.json"))) == 2


def test_empty_fact_list_is_fine(tiny_gpt2):
    from facts.knowledge import check_knowledge

    assert check_knowledge(tiny_gpt2, [], progress=False) == []


def test_known_stage_results_count_skipped_records_and_why(compose_config, tmp_path):
    rows = [{"subject": "Lyon", "relation_id": "P190", "template": "The twin city of {} is", "object": "Beirut"},
            {"subject": "Oslo", "relation_id": "P190", "template": "{} lies in", "object": ""}]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    cfg = compose_config("stage=known", "model=tiny_gpt2", "dataset=user", f"dataset.path={path}", "logger=none",
                         f"paths.cache_dir={tmp_path / 'cache'}")
    run_job(cfg, tmp_path / "job")
    results = json.loads((tmp_path / "job" / "results.json").read_text())["results"]
    assert results["n_facts"] == 1 and results["n_skipped"] == 1
    assert results["skip_reasons"] == {"target_true: must be a non-empty string": 1}
