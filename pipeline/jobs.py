"""The job wrapper around every stage: done-markers, status, atomic results, logger lifecycle.

A job dir holds ``config.yaml`` (resolved), ``status.json`` (running -> done | failed, with the
error's class/key/value/hint) and, last of all, ``results.json``: the done-marker. A job whose
``results.json`` exists is skipped unless ``force=true``. A stage may keep finished parts of an
unfinished job in ``progress/`` (resumed on rerun, cleared here by ``force=true``; the stage removes it
once its files are written).
"""

from __future__ import annotations

import importlib
import logging
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from core.errors import ConfigError, ToolkitError
from core.io import atomic_write_json, atomic_write_text, read_json
from pipeline.loggers import make_logger

log = logging.getLogger(__name__)

RESULTS = "results.json"
STATUS = "status.json"
# Partial work of an unfinished job (stages that can resume mid-way write here); gone once done.
PROGRESS = "progress"

StageFn = Callable[[DictConfig, Path, Any], dict]


def stage_function(name: str) -> StageFn:
    """Stages live in ``pipeline/stages/<name>.py`` as ``run(cfg, job_dir, logger) -> dict``."""
    from pipeline.config import available_options

    try:
        module = importlib.import_module(f"pipeline.stages.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"pipeline.stages.{name}":
            raise
        raise ConfigError("stage", name, "unknown stage", hint=f"use one of {', '.join(available_options('stage'))}") from err
    return module.run


def is_done(job_dir: Path) -> bool:
    return (job_dir / RESULTS).exists()


def run_job(cfg: DictConfig, job_dir: Path, job_name: str = "defaults") -> dict:
    """Run ``cfg.stage`` in ``job_dir`` unless it is already done; returns the results dict."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    if is_done(job_dir) and not cfg.get("force", False):
        log.info("skipping %s: %s exists (force=true recomputes)", job_dir, RESULTS)
        return read_json(job_dir / RESULTS)
    if is_done(job_dir):
        (job_dir / RESULTS).unlink()
    if cfg.get("force", False):
        for partial in [p for p in job_dir.rglob(PROGRESS) if p.is_dir()]:
            shutil.rmtree(partial)
    for stale in job_dir.rglob(".tmp-*"):  # left by a killed run; never read, so just clear them
        stale.unlink()
    stage = cfg.stage.name
    atomic_write_text(job_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    started = time.time()
    atomic_write_json(job_dir / STATUS, {"status": "running", "stage": stage, "started": started})
    logger = make_logger(cfg.logger, job_dir, group=cfg.sweep_name, job_type=stage, name=job_name,
                         config=OmegaConf.to_container(cfg, resolve=True))
    failed = True
    try:
        results = stage_function(stage)(cfg, job_dir, logger)
        payload = {"stage": stage, "job": job_name, "seconds": round(time.time() - started, 3), "results": results}
        atomic_write_json(job_dir / RESULTS, payload)
        atomic_write_json(job_dir / STATUS, {"status": "done", "stage": stage, "started": started, "finished": time.time()})
        failed = False
        return payload
    except BaseException as err:
        error = err.to_dict() if isinstance(err, ToolkitError) else {"class": type(err).__name__, "message": str(err)}
        error["traceback"] = traceback.format_exc()
        atomic_write_json(job_dir / STATUS, {"status": "failed", "stage": stage, "started": started,
                                             "finished": time.time(), "error": error})
        raise
    finally:
        logger.close(failed=failed)


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
