"""The job wrapper around every stage: done-markers, status, atomic results, logger lifecycle.

A job dir holds ``config.yaml`` (resolved), ``status.json`` (running -> done | failed, with pid,
host and a heartbeat while running, and the error's class/key/value/hint on failure) and, last of
all, ``results.json``: the done-marker. Rules that keep finished work safe:

- A job whose ``results.json`` exists is skipped, unless ``force=true``; a rerun whose config
  differs from the one that produced it (``pipeline.fingerprint``) is refused with the differing
  keys, so a job dir never serves another config's results.
- ``force=true`` sets the finished job's files aside in ``.previous/`` and restores them if the
  recompute fails (``status.json``: ``recompute_failed``) or was killed (on the next start).
- Identical jobs started together take turns on the job lock (``pipeline.joblock``): exactly one
  computes, the other then finds its results. Temp files are cleared only under the lock.
- A stage may keep finished parts of an unfinished job in ``progress/`` (resumed on rerun, cleared
  by ``force=true``; the stage removes it once its files are written).
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from core.errors import CacheError, ConfigError, ResourceError, ToolkitError
from core.hashing import content_hash, repair_enabled, repairing
from core.io import atomic_write_json, atomic_write_text, read_json
from pipeline.config import validate_root
from pipeline.fingerprint import comparable_config, config_diff
from pipeline.joblock import LOCK, STATUS, Heartbeat, job_lock, read_status
from pipeline.loggers import make_logger

log = logging.getLogger(__name__)

RESULTS = "results.json"
CONFIG = "config.yaml"
# Partial work of an unfinished job (stages that can resume mid-way write here); gone once done.
PROGRESS = "progress"
# A finished job's files while ``force=true`` recomputes it.
PREVIOUS = ".previous"
# Room kept free in the job dir so that a full disk can still record ``failed`` (see ``_write_status``).
STATUS_RESERVE = ".status-reserve"
STATUS_RESERVE_BYTES = 16384
# Entries of a job dir that belong to the job dir, not to one run of the stage.
JOB_DIR_ENTRIES = (LOCK, STATUS, STATUS_RESERVE, PREVIOUS, "wandb", ".hydra")

StageFn = Callable[[DictConfig, Path, Any], dict]


def stage_function(name: str) -> StageFn:
    """Stages live in ``pipeline/stages/<name>.py`` as ``run(cfg, job_dir, logger) -> dict``."""
    from core.conf import available_options

    try:
        module = importlib.import_module(f"pipeline.stages.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"pipeline.stages.{name}":
            raise
        raise ConfigError("stage", name, "unknown stage", hint=f"use one of {', '.join(available_options('stage'))}") from err
    return module.run


def run_job(cfg: DictConfig, job_dir: Path, job_name: str = "defaults") -> dict:
    """Run ``cfg.stage`` in ``job_dir`` unless it is already done; returns the results dict."""
    validate_root(cfg)
    job_dir = Path(job_dir)
    comparable = comparable_config(cfg)
    force = bool(cfg.force)
    finished = _finished(job_dir)
    if finished is not None and not force:  # a rerun of a finished job writes nothing (read-only dirs work)
        return _serve(job_dir, finished, comparable)
    job_dir.mkdir(parents=True, exist_ok=True)
    with job_lock(job_dir):
        _recover_interrupted_recompute(job_dir)
        finished = _finished(job_dir)
        if finished is not None and not force:  # an identical job finished it while this one waited
            return _serve(job_dir, finished, comparable)
        for stale in job_dir.rglob(".tmp-*"):  # left by a killed run: under the lock no live job writes here
            stale.unlink()
        if finished is None:
            _check_resumable(job_dir, comparable, force)
        return _run_locked(cfg, job_dir, job_name, comparable, previous=_set_aside(job_dir) if finished else None)


def _run_locked(cfg: DictConfig, job_dir: Path, job_name: str, comparable: dict, previous: Path | None) -> dict:
    stage = cfg.stage.name
    if cfg.force:
        for partial in [p for p in job_dir.rglob(PROGRESS) if p.is_dir() and PREVIOUS not in p.parts]:
            shutil.rmtree(partial)
    _reserve_status_room(job_dir)
    atomic_write_text(job_dir / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    started = time.time()
    fields: dict[str, Any] = {"stage": stage, "started": started}
    last = read_status(job_dir)
    if last and last.get("status") == "running":  # we hold the lock, so that process is gone
        log.warning("the previous attempt in %s died (pid %s on %s); resuming", job_dir, last.get("pid"), last.get("host"))
        fields["previous_attempt"] = {k: last.get(k) for k in ("pid", "host", "started", "heartbeat")} | {"status": "died"}
    heartbeat = Heartbeat(job_dir, fields).start()
    logger = make_logger(cfg.logger, job_dir, group=cfg.sweep_name, job_type=stage, name=job_name,
                         config=OmegaConf.to_container(cfg, resolve=True))
    failed = True
    try:
        with repairing(bool(cfg.cache.repair) or bool(cfg.force) or repair_enabled()):  # never turns a caller's off
            results = stage_function(stage)(cfg, job_dir, logger)
        payload = {"stage": stage, "job": job_name, "seconds": round(time.time() - started, 3),
                   "config_fingerprint": content_hash(comparable), "results": results}
        heartbeat.stop()
        atomic_write_json(job_dir / RESULTS, payload)
        if previous is not None:
            shutil.rmtree(previous)
        _write_status(job_dir, {"status": "done", "stage": stage, "started": started, "finished": time.time()})
        (job_dir / STATUS_RESERVE).unlink(missing_ok=True)
        failed = False
        return payload
    except BaseException as err:
        heartbeat.stop()
        error = err.to_dict() if isinstance(err, ToolkitError) else {"class": type(err).__name__, "message": str(err)}
        error["traceback"] = traceback.format_exc()
        status = {"status": "failed", "stage": stage, "started": started, "finished": time.time(), "error": error}
        if previous is not None:
            _restore(job_dir, previous)
            status |= {"status": "recompute_failed",
                       "note": "the recompute failed; results.json and its files are the previous finished run's"}
        _write_status(job_dir, status)
        (job_dir / STATUS_RESERVE).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise _disk_full(cfg, err) from err
        raise
    finally:
        logger.close(failed=failed)


def _finished(job_dir: Path) -> dict | None:
    marker = job_dir / RESULTS
    if not marker.exists():
        return None
    try:
        return read_json(marker)
    except (OSError, ValueError) as err:  # written atomically, so only a hand edit or a broken disk gets here
        raise CacheError(RESULTS, str(marker), f"unreadable done-marker ({err})",
                         hint="restore it, or rerun with force=true to recompute the job") from err


def _serve(job_dir: Path, finished: dict, comparable: dict) -> dict:
    """A finished job's results, if its config is the one asked for now."""
    stored = finished.get("config_fingerprint")
    if stored is None:
        log.warning("%s has no config fingerprint (made by an older version); serving it unchecked", job_dir)
    elif stored != content_hash(comparable):
        raise ConfigError("config", _diff_from_stored(job_dir, comparable),
                          f"differs from the config that produced the finished job in {job_dir}",
                          hint="force=true recomputes it (the finished files stay until the new ones are written), "
                               "or use another sweep_name to keep both")
    log.info("skipping %s: %s exists (force=true recomputes)", job_dir, RESULTS)
    return finished


def _diff_from_stored(job_dir: Path, comparable: dict) -> list[str]:
    try:
        old = comparable_config(OmegaConf.to_container(OmegaConf.load(job_dir / CONFIG), resolve=False))
    except (OSError, ValueError):
        return ["(config.yaml of the finished job is missing)"]
    return config_diff(old, comparable)


def _check_resumable(job_dir: Path, comparable: dict, force: bool) -> None:
    """An unfinished job resumes its finished steps only under the config that made them."""
    partial = [p for p in job_dir.rglob("*") if p.name in (PROGRESS, RESULTS) and PREVIOUS not in p.parts]
    if force or not partial or not (job_dir / CONFIG).exists():
        return
    diff = _diff_from_stored(job_dir, comparable)
    if diff:
        raise ConfigError("config", diff, f"differs from the config of the unfinished job in {job_dir}, whose "
                          "finished steps would be reused", hint="force=true starts it over, or use another sweep_name")


def _set_aside(job_dir: Path) -> Path:
    """Move a finished run's files into ``.previous/`` (renames: cheap, each one atomic)."""
    previous = job_dir / PREVIOUS
    previous.mkdir()
    for entry in _run_entries(job_dir):
        os.replace(entry, previous / entry.name)
    return previous


def _restore(job_dir: Path, previous: Path) -> None:
    """Drop what a failed or killed recompute wrote and put the finished run's files back."""
    for entry in _run_entries(job_dir):
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for entry in previous.iterdir():
        os.replace(entry, job_dir / entry.name)
    previous.rmdir()


def _recover_interrupted_recompute(job_dir: Path) -> None:
    previous = job_dir / PREVIOUS
    if previous.is_dir():
        log.warning("a recompute of %s was interrupted; restoring the finished run's files", job_dir)
        _restore(job_dir, previous)


def _run_entries(job_dir: Path) -> list[Path]:
    """The entries one run of a stage owns (not the lock, status, W&B dir or Hydra's log file)."""
    return [p for p in job_dir.iterdir() if p.name not in JOB_DIR_ENTRIES and p.suffix != ".log"]


def _reserve_status_room(job_dir: Path) -> None:
    reserve = job_dir / STATUS_RESERVE
    if not reserve.exists() or reserve.stat().st_size < STATUS_RESERVE_BYTES:
        with open(reserve, "wb") as handle:
            handle.write(b" " * STATUS_RESERVE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())


def _write_status(job_dir: Path, status: dict) -> None:
    """Write ``status.json`` atomically; on a full disk, through the reserved file (its blocks exist
    already, and a rename needs none), so a job that failed never reads ``running``."""
    try:
        atomic_write_json(job_dir / STATUS, status)
        return
    except OSError as err:
        if err.errno != errno.ENOSPC or not (job_dir / STATUS_RESERVE).exists():
            log.error("status.json of %s not written (%s)", job_dir, err)
            return
    error = status.get("error", {})
    while True:
        data = json.dumps(status, default=str).encode()
        if len(data) < STATUS_RESERVE_BYTES or not error.get("traceback"):
            break
        error["traceback"] = error["traceback"][len(error["traceback"]) // 2:]  # keep the innermost frames
    with open(job_dir / STATUS_RESERVE, "r+b") as handle:
        handle.write(data[:STATUS_RESERVE_BYTES])
        handle.truncate(len(data[:STATUS_RESERVE_BYTES]))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(job_dir / STATUS_RESERVE, job_dir / STATUS)


def _disk_full(cfg: DictConfig, err: OSError) -> ResourceError:
    where = str(err.filename or "")
    key = "paths.cache_dir" if cfg.paths.cache_dir and where.startswith(str(cfg.paths.cache_dir)) else "paths.output_dir"
    return ResourceError(key, where or cfg.paths.get(key.split(".")[1]), "no space left on device",
                         hint="free some space (or point the path elsewhere) and rerun: finished jobs and steps are kept")


def finished_steps(sweep_dir: str | Path, step: str, include_full: bool = True) -> list[tuple[Path, Path, dict]]:
    """(job dir, dir holding the step's files, results) of every finished ``stage=<step>`` job under
    ``sweep_dir`` and, with ``include_full``, of the ``<step>/`` step of every finished ``full`` job."""
    found = []
    for marker in sorted(Path(sweep_dir).rglob(RESULTS)):
        payload = read_json(marker)
        if payload.get("stage") == step:
            found.append((marker.parent, marker.parent, payload["results"]))
        elif include_full and payload.get("stage") == "full" and step in payload.get("results", {}):
            found.append((marker.parent, marker.parent / step, payload["results"][step]))
    return found
