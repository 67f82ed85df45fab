"""Finished jobs are never lost or served stale; identical jobs take turns; a dead job reads ``died``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.errors import ConfigError, ResourceError
from helpers import shared_model_cache
from pipeline.fingerprint import comparable_config
from pipeline.joblock import job_state
from pipeline.jobs import PREVIOUS, RESULTS, _set_aside, run_job

ROOT = Path(__file__).resolve().parent.parent


def _known(compose_config, tmp_path, *extra):
    return compose_config("stage=known", "model=tiny_gpt2", "dataset=known", "dataset.limit=6", "logger=none",
                          f"paths.cache_dir={shared_model_cache(tmp_path)}", *extra)


def _files(job_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in job_dir.iterdir() if p.is_file() and p.name != "status.json"}


def test_failed_recompute_keeps_the_finished_job(compose_config, tmp_path):
    job = tmp_path / "job"
    run_job(_known(compose_config, tmp_path), job)
    before = _files(job)
    with pytest.raises(ConfigError, match="model.dtype"):
        run_job(_known(compose_config, tmp_path, "force=true", "model.dtype=float8"), job)
    assert _files(job) == before, "results.json and every file of the finished job must be as they were"
    status = json.loads((job / "status.json").read_text())
    assert status["status"] == "recompute_failed" and status["error"]["key"] == "model.dtype"
    assert not (job / PREVIOUS).exists()
    # the finished job still serves its results to a plain rerun
    assert run_job(_known(compose_config, tmp_path), job) == json.loads(before[RESULTS])


def test_killed_recompute_is_rolled_back_on_the_next_start(compose_config, tmp_path):
    job = tmp_path / "job"
    first = run_job(_known(compose_config, tmp_path), job)
    before = _files(job)
    _set_aside(job)  # exactly what force=true has done when it is killed mid-recompute...
    (job / "knowledge.jsonl").write_text("half of a new run\n")  # ...after writing some new files
    assert run_job(_known(compose_config, tmp_path), job) == first
    assert _files(job) == before and not (job / PREVIOUS).exists()


def test_changed_config_is_refused_with_its_keys_and_force_recomputes(compose_config, tmp_path):
    job = tmp_path / "job"
    run_job(_known(compose_config, tmp_path), job)
    with pytest.raises(ConfigError) as info:
        run_job(_known(compose_config, tmp_path, "dataset.limit=5"), job)
    assert info.value.key == "config" and info.value.value == ["dataset.limit: 6 -> 5"]
    assert "force=true" in info.value.hint
    assert run_job(_known(compose_config, tmp_path, "dataset.limit=5", "force=true"), job)["results"]["n_facts"] == 5
    # keys that do not change results never count: logging, progress bars, force, paths
    assert run_job(_known(compose_config, tmp_path, "dataset.limit=5", "logger=wandb"), job)["results"]["n_facts"] == 5


def test_fingerprint_ignores_where_the_project_lives(compose_config, tmp_path):
    a = comparable_config(compose_config("stage=summarize", "paths.root_dir=/a/project", "paths.output_dir=/a/project/out"))
    b = comparable_config(compose_config("stage=summarize", "paths.root_dir=/b/elsewhere", "paths.output_dir=/b/elsewhere/out"))
    assert a == b and a["stage.sweep_dir"] == "${paths.output_dir}/sweeps/default"
    traced = comparable_config(compose_config("stage=trace"))
    assert traced == comparable_config(compose_config("stage=trace", "stage.fabric.devices=2")), "sharding changes no result"
    assert traced != comparable_config(compose_config("stage=trace", "stage.samples=3"))


def test_unfinished_job_resumes_only_under_its_own_config(compose_config, tmp_path):
    job = tmp_path / "job"
    run_job(_known(compose_config, tmp_path), job)
    (job / RESULTS).unlink()
    (job / "progress").mkdir()  # finished parts of an unfinished job
    with pytest.raises(ConfigError, match="unfinished"):
        run_job(_known(compose_config, tmp_path, "dataset.limit=4"), job)
    assert run_job(_known(compose_config, tmp_path), job)["results"]["n_facts"] == 6


def test_job_state_tells_running_from_died(tmp_path):
    status = {"status": "running", "pid": os.getpid(), "host": os.uname().nodename, "heartbeat": time.time(),
              "heartbeat_seconds": 30}
    (tmp_path / "status.json").write_text(json.dumps(status))
    assert job_state(tmp_path) == "running"
    assert job_state(tmp_path, now=time.time() + 1000) == "died", "a stale heartbeat means dead, on any host"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "status.json").write_text(json.dumps({**status, "pid": dead.pid}))
    assert job_state(tmp_path) == "died"
    assert job_state(tmp_path / "nothing") == "none"


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.run", "stage=known", "model=tiny_gpt2", "dataset=known", "logger=none",
            f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={shared_model_cache(tmp_path)}", *extra]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def test_identical_jobs_started_together_compute_once(tmp_path):
    """The same job launched twice at once, 10 times: no crash, exactly one computation each time."""
    shared_model_cache(tmp_path)  # the cache dir the race uses
    script = f"import json, helpers; print(json.dumps(helpers.race_identical_jobs({str(tmp_path)!r}, 10)))"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT / "tests", env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(trials) == 10
    for outcomes in trials:
        assert not [o for o in outcomes if o.startswith("crashed")], outcomes
        assert sorted(o.split("+")[-1] for o in outcomes) == ["computed", "skipped"], outcomes
    assert any(o.startswith("waited") for outcomes in trials for o in outcomes), \
        "no trial overlapped on the job lock, so the test did not exercise it"


@pytest.mark.slow
def test_killed_job_reads_died_and_its_rerun_says_so(tmp_path):
    job_dirs = tmp_path / "out" / "runs"
    proc = subprocess.Popen(_cli(tmp_path, "dataset.limit=null", "stage.batch_size=1"), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(job_dirs.rglob("status.json")):
        time.sleep(0.2)
    status_file = next(job_dirs.rglob("status.json"))
    assert job_state(status_file.parent) == "running"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(status_file.read_text())["status"] == "running"
    assert job_state(status_file.parent) == "died"
    rerun = subprocess.run(_cli(tmp_path, "dataset.limit=null", "stage.batch_size=1"), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "previous attempt" in rerun.stderr + rerun.stdout
    assert job_state(status_file.parent) == "done"


@pytest.fixture()
def read_only(tmp_path):
    """Make a directory truly read-only, for root too: a read-only bind mount (skipped where not allowed)."""
    mounted = []

    def make(path: Path) -> None:
        for cmd in (["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,ro,bind", str(path)]):
            if subprocess.run(cmd, capture_output=True).returncode:
                pytest.skip("cannot bind-mount read-only here")
            mounted.append(path) if cmd[1] == "--bind" else None

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_rerun_of_a_finished_job_in_a_read_only_dir_exits_0(tmp_path, read_only):
    done = subprocess.run(_cli(tmp_path, "dataset.limit=3"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    snapshot = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "out").rglob("*"))
    read_only(tmp_path / "out")
    with pytest.raises(OSError):
        (tmp_path / "out" / "probe").write_text("")
    again = subprocess.run(_cli(tmp_path, "dataset.limit=3"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipping" in again.stdout + again.stderr
    assert sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "out").rglob("*")) == snapshot


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 512 KiB tmpfs: a real full disk (skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_fails_with_a_named_error_and_a_failed_status(compose_config, tmp_path, tiny_disk):
    job = tiny_disk / "job"
    job.mkdir()
    stats = os.statvfs(tiny_disk)
    (tiny_disk / "filler").write_bytes(b"x" * (stats.f_bavail * stats.f_frsize - 40 * 1024))
    with pytest.raises(ResourceError) as info:  # knowledge.jsonl of 1,209 facts needs ~200 KiB
        run_job(_known(compose_config, tmp_path, "dataset.limit=null"), job)
    assert info.value.key == "paths.output_dir" and "space" in info.value.problem
    status = json.loads((job / "status.json").read_text())
    assert status["status"] == "failed" and "No space left" in status["error"]["message"]
    assert not (job / RESULTS).exists()


def test_status_command_lists_each_job_state(compose_config, tmp_path, capsys):
    from pipeline.status import job_rows, main

    run_job(_known(compose_config, tmp_path), tmp_path / "sweep" / "a")
    with pytest.raises(ConfigError):
        run_job(_known(compose_config, tmp_path, "model.dtype=float8"), tmp_path / "sweep" / "b")
    dead = {"status": "running", "stage": "known", "pid": 2**22 + 17, "host": os.uname().nodename,
            "started": time.time() - 100, "heartbeat": time.time() - 100, "heartbeat_seconds": 30}
    (tmp_path / "sweep" / "c").mkdir()
    (tmp_path / "sweep" / "c" / "status.json").write_text(json.dumps(dead))
    rows = {row["job"]: row for row in job_rows(tmp_path / "sweep")}
    assert [rows[j]["state"] for j in "abc"] == ["done", "failed", "died"]
    assert "model.dtype" in rows["b"]["detail"] and "heartbeat 100 s ago" in rows["c"]["detail"]
    main([str(tmp_path / "sweep")])
    assert "1 died, 1 done, 1 failed" in capsys.readouterr().out
