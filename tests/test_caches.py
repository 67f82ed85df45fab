"""Caches: a complete cache is read without writing anything (even when read-only), a corrupt entry
is a CacheError naming the file, and ``repairing(True)`` recomputes it to the same value."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import pytest

import cache_kinds
from core.errors import CacheError
from core.hashing import CacheEntry, repair_enabled, repairing
from helpers import write_known_user_facts
from pipeline.jobs import run_job

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 torch thread (2 shared cores)


# ------------------------------------------------------------------------------- CacheEntry
def _demo(root: Path) -> tuple[CacheEntry, list[int]]:
    """A demo entry read or computed once; returns it and the compute calls made."""
    calls: list[int] = []

    def compute(entry: CacheEntry) -> dict:
        calls.append(1)
        entry.dir.mkdir(parents=True, exist_ok=True)
        (entry.dir / "value.json").write_text(json.dumps({"x": 1}))
        return {"x": 1}

    entry = CacheEntry(root, "demo", {"k": 1})
    assert entry.load_or_compute(lambda e: e.read("value.json"), compute) == {"x": 1}
    return entry, calls


def test_reading_a_complete_entry_creates_nothing(tmp_path):
    entry, calls = _demo(tmp_path)
    Path(str(entry.dir) + ".lock").unlink()
    before = _tree(tmp_path)
    assert entry.path("other.json") == entry.dir / "other.json"
    assert CacheEntry(tmp_path, "demo", {"k": 1}).load_or_compute(lambda e: e.read("value.json"), _never) == {"x": 1}
    assert not CacheEntry(tmp_path, "demo", {"k": 2}).done
    CacheEntry(tmp_path, "other", {"k": 2}).path("x.json")
    assert _tree(tmp_path) == before and calls == [1]


@pytest.mark.parametrize("name", ["key.json", "value.json"])
def test_corrupt_file_is_a_named_error_and_repairing_recomputes_it(tmp_path, name):
    entry, calls = _demo(tmp_path)
    cache_kinds.truncate(entry.dir / name)
    with pytest.raises(CacheError) as info:
        _demo(tmp_path)
    assert info.value.key == "cache.demo" and info.value.value == str(entry.dir / name)
    assert "repair" in info.value.hint and str(entry.dir) in info.value.hint
    with repairing(True):
        assert repair_enabled()
        _, again = _demo(tmp_path)
        with repairing(False):
            assert not repair_enabled()
    assert not repair_enabled() and again == [1]
    assert entry.done and entry.read("value.json") == {"x": 1}


def test_missing_entry_in_an_unwritable_cache_names_the_cache_dir(tmp_path):
    (tmp_path / "file").write_text("a file where the cache dir should be")
    with pytest.raises(CacheError) as info:
        _demo(tmp_path / "file" / "cache")
    assert info.value.key == "paths.cache_dir" and "KLOC_CACHE_DIR" in info.value.hint


def _never(entry: CacheEntry):
    raise AssertionError(f"{entry.dir} was recomputed")


def _tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` (links not followed) with its mtime: what a run may not change."""
    return {str(p.relative_to(root)): p.lstat().st_mtime_ns for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------------------- every cache kind
@pytest.fixture(scope="module")
def loaded():
    return cache_kinds.tiny_gpt2()


# recomputing a converted model converts the GGUF again (~20 s): slow
@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k.slow_repair else k for k in cache_kinds.KINDS],
                         ids=cache_kinds.case_id)
def test_repairing_recomputes_each_corrupt_kind_to_the_same_value(kind, loaded, tmp_path):
    original, damaged = cache_kinds.fill_and_damage(kind, loaded, tmp_path)
    with pytest.raises(CacheError) as info:
        kind.fill(loaded, tmp_path)
    assert info.value.key == f"cache.{kind.kind}" and info.value.value == str(damaged)
    with repairing(True):
        if kind.kind == "mend":  # a trained network cannot be recomputed here: it is removed, and retraining named
            with pytest.raises(Exception, match="train"):
                kind.fill(loaded, tmp_path)
            assert not damaged.parent.exists()
            return
        assert kind.fill(loaded, tmp_path) == original
    assert kind.fill(loaded, tmp_path) == original  # and it is a normal entry again


# ------------------------------------------------------------------ a read-only, complete cache
FULL = ["stage=full", "model=tiny_gpt2", "logger=none", "editor=rome", "perspective=entity", "editor.layers=[1]",
        "editor.stats.n_samples=20", "editor.stats.max_tokens=32", "editor.v_num_grad_steps=2",
        "editor.context_template_lengths=[[3,2]]", "stage.edit.n_cases=2", "stage.edit.n_resamples=10",
        "stage.edit.progress=false", "stage.trace.n_facts=2", "stage.trace.samples=2", "stage.trace.window=2",
        "stage.trace.n_bootstrap=20", "stage.trace.plot_facts=0", "stage.trace.progress=false",
        "stage.trace.severed=false", "stage.trace_dataset.name=user"]


@pytest.fixture(scope="module")
def filled(loaded):
    """A cache filled by one full job (known facts, embedding std, traces, templates, second moments),
    in a dir that another user can reach (pytest's tmp dirs are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="kloc-readonly-"))
    base.chmod(0o755)
    write_known_user_facts(loaded, base / "facts.jsonl")
    (base / "cache").mkdir()
    (base / "cache" / "models").symlink_to(Path(os.environ["KLOC_CACHE_DIR"]).resolve() / "models")
    overrides = [*FULL, f"stage.trace_dataset.path={base / 'facts.jsonl'}", f"paths.cache_dir={base / 'cache'}",
                 f"paths.output_dir={base / 'outputs'}"]
    yield base, overrides
    for directory in [base, *[p for p in base.rglob("*") if p.is_dir() and not p.is_symlink()]]:
        directory.chmod(0o755)
    shutil.rmtree(base)


def test_forced_rerun_on_a_complete_cache_writes_nothing_there(filled, compose_config):
    base, overrides = filled
    run_job(compose_config(*overrides), base / "job")
    kinds = {p.name for p in (base / "cache").iterdir()}
    assert {"knowledge", "traces", "embedding_std", "context_templates", "second_moments"} <= kinds, kinds
    _remove_locks(base / "cache")
    before = _tree(base / "cache")
    payload = run_job(compose_config(*overrides, "force=true"), base / "job-forced")
    assert payload["results"]["trace"]["n_from_cache"] == 2
    assert _tree(base / "cache") == before


def test_read_only_cache_serves_a_whole_job_and_names_the_dir_for_a_missing_entry(filled, compose_config):
    base, overrides = filled
    if not (base / "job" / "results.json").exists():
        run_job(compose_config(*overrides), base / "job")
    _remove_locks(base / "cache")
    preexec = _read_only_access(base)
    before = _tree(base / "cache")
    for directory in [base / "cache", *[p for p in (base / "cache").rglob("*") if p.is_dir() and not p.is_symlink()]]:
        directory.chmod(0o555)
    script = (
        "import sys, json\n"
        "from hydra import compose, initialize_config_dir\n"
        "from core.conf import CONF_DIR\n"
        "from pipeline.config import register_configs\n"
        "from pipeline.jobs import run_job\n"
        "from core.errors import ToolkitError\n"
        "register_configs()\n"
        "args = json.loads(sys.argv[1])\n"
        "with initialize_config_dir(config_dir=str(CONF_DIR), version_base='1.3'):\n"
        "    payload = run_job(compose(config_name='config', overrides=args + ['force=true']), sys.argv[2])\n"
        "    print('from_cache', payload['results']['trace']['n_from_cache'])\n"
        "    try:\n"
        "        run_job(compose(config_name='config', overrides=args + ['stage.trace.samples=3']), sys.argv[3])\n"
        "    except ToolkitError as err:\n"
        "        print('missing', err.key)\n"
    )
    jobs = base / "jobs"
    jobs.mkdir(mode=0o777)
    jobs.chmod(0o777)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(jobs), "MPLCONFIGDIR": str(jobs / "mpl"),
           "HF_HOME": str(jobs / "hf"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(overrides), str(jobs / "a"), str(jobs / "b")],
                          cwd=jobs, env=env, preexec_fn=preexec, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "from_cache 2" in done.stdout and "missing paths.cache_dir" in done.stdout, done.stdout + done.stderr[-3000:]
    assert _tree(base / "cache") == before


def _remove_locks(cache: Path) -> None:
    """Lock files left by computing the entries (not those of the shared, symlinked models dir)."""
    for lock in cache.rglob("*.lock"):
        lock.unlink()


def _read_only_access(base: Path) -> Callable[[], None] | None:
    """A preexec function under which a 0555 dir cannot be written: as root, become nobody when the
    interpreter is reachable to others, else drop root's permission-bypass capabilities (CAP_DAC_*)."""
    if os.geteuid() != 0:
        candidates: list[Callable[[], None] | None] = [None]
    else:
        candidates = [_become_nobody, _drop_dac_capabilities]
    probe = base / "probe"
    probe.mkdir(exist_ok=True)
    probe.chmod(0o555)
    try:
        for preexec in candidates:
            try:
                wrote = subprocess.run([sys.executable, "-c", f"open({str(probe / 'x')!r}, 'w')"], preexec_fn=preexec,
                                       capture_output=True, timeout=60).returncode == 0
                started = subprocess.run([sys.executable, "-c", "import torch"], preexec_fn=preexec,
                                         capture_output=True, timeout=120).returncode == 0
            except (OSError, subprocess.SubprocessError):
                continue
            if started and not wrote:
                return preexec
            (probe / "x").unlink(missing_ok=True)
    finally:
        probe.chmod(0o755)
        shutil.rmtree(probe)
    pytest.skip("neither nobody, nor dropped capabilities, nor chmod make a dir read-only here")


def _become_nobody() -> None:
    os.setgid(65534)
    os.setuid(65534)


def _drop_dac_capabilities() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER (from the bounding set)
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_sharded_trace_ranks_repair_too(compose_config, loaded, tmp_path, monkeypatch):
    """Spawned ranks start with a fresh context: the stage hands them its repair switch."""
    import contextvars

    import pipeline.stages.trace as trace_stage

    write_known_user_facts(loaded, tmp_path / "facts.jsonl")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(Path(os.environ["KLOC_CACHE_DIR"]).resolve() / "models")
    overrides = ["stage=trace", "model=tiny_gpt2", "dataset=user", f"dataset.path={tmp_path / 'facts.jsonl'}", "logger=none",
                 f"paths.cache_dir={tmp_path / 'cache'}", "stage.samples=2", "stage.window=2", "stage.n_bootstrap=20",
                 "stage.plot_facts=0", "stage.progress=false", "stage.kinds=[hidden]", "stage.severed=false",
                 "stage.fabric.accelerator=cpu"]
    first = run_job(compose_config(*overrides), tmp_path / "job")["results"]
    cache_kinds.truncate(sorted((tmp_path / "cache" / "traces").glob("*/trace.safetensors"))[0])

    def ranks_in_a_fresh_context(task, items, config):  # what ddp_spawn ranks see, without spawning
        return contextvars.Context().run(task, list(items), "cpu")

    monkeypatch.setattr(trace_stage, "map_sharded", ranks_in_a_fresh_context)
    with repairing(True):
        again = run_job(compose_config(*overrides, "stage.fabric.devices=2"), tmp_path / "job2")["results"]
    assert again["n_from_cache"] == first["n_traced"] - 1 and again["p_clean"] == first["p_clean"]
