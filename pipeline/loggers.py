"""Experiment loggers: W&B (offline by default) or none. A logging failure never loses local results.

W&B runs carry ``group`` = sweep name and ``job_type`` = stage, the run name is the job's
overrides, and the run id is a hash of (sweep, overrides) so a rerun resumes the same run.

Offline means offline: with ``logger.mode=offline`` a job opens no network connection and runs no
``git``. wandb 0.31 otherwise does both even for an offline run: its process-wide telemetry follows
the *global* settings (online unless told), so ``run.log`` feeds an OpenTelemetry exporter that
probes ``https://api.forge.coreweave.com`` at exit; and it runs ``git rev-parse`` / ``git config``
for the code path and the run's git info. ``tests/test_offline.py`` checks this under strace.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from core.hashing import content_hash

log = logging.getLogger(__name__)

# Settings of every run: no console capture, no system metrics (they also probe a cloud metadata
# address), no system metadata.
BASE_SETTINGS: dict[str, Any] = {"console": "off", "silent": True, "x_disable_stats": True, "x_disable_meta": True}
# Offline runs also keep no git state (``git rev-parse``/``git config``), code, requirements list or
# machine info; ``mode`` goes into the global settings too, which is what turns wandb's telemetry off.
OFFLINE_SETTINGS: dict[str, Any] = {"mode": "offline", "disable_git": True, "disable_code": True, "save_code": False,
                                    "disable_job_creation": True, "x_disable_machine_info": True,
                                    "x_save_requirements": False}
# Two switches wandb reads only from the environment, so they are set while wandb starts and
# restored after: WANDB_DISABLE_GIT before the global settings first load (they run
# ``git rev-parse`` before any Settings override applies), and WANDB_ERROR_REPORTING=false, which
# starts wandb-core with --no-observability (no Sentry, no telemetry export) and disables the
# Python telemetry recorder. wandb keeps its service and global settings for the whole process,
# so a later online run in the same process keeps these offline choices.
OFFLINE_ENVIRON: dict[str, str] = {"WANDB_DISABLE_GIT": "true", "WANDB_ERROR_REPORTING": "false"}


def job_environ(job_dir: Path) -> dict[str, str]:
    """Where wandb keeps files outside the run dir, moved into ``<job_dir>/wandb``.

    By default wandb stages every artifact file under ``~/.local/share/wandb/artifacts/staging``
    (``WANDB_DATA_DIR``; an offline run's artifacts stay there until ``wandb sync``) and writes its
    service log under ``~/.cache/wandb`` (``WANDB_CACHE_DIR``): a copied or synced job dir would
    lose its artifacts. Both are set only while wandb starts and while an artifact is logged.
    """
    root = Path(job_dir).resolve() / "wandb"
    return {"WANDB_DATA_DIR": str(root), "WANDB_CACHE_DIR": str(root / "cache")}


@contextlib.contextmanager
def scoped_environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore what was there."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class RunLogger(Protocol):
    def log_scalars(self, values: dict[str, float], step: int | None = None) -> None: ...
    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None: ...
    def log_image(self, name: str, path: Path) -> None: ...
    def log_artifact(self, name: str, paths: list[Path], kind: str) -> None: ...
    def close(self, failed: bool = False) -> None: ...


class NullLogger:
    """Keeps nothing beyond the job dir's own files."""

    def log_scalars(self, values: dict[str, float], step: int | None = None) -> None:
        return None

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        return None

    def log_image(self, name: str, path: Path) -> None:
        return None

    def log_artifact(self, name: str, paths: list[Path], kind: str) -> None:
        return None

    def close(self, failed: bool = False) -> None:
        return None


class WandbLogger:
    """A thin, failure-tolerant wrapper over one W&B run in ``<job_dir>/wandb``."""

    def __init__(self, job_dir: Path, project: str, entity: str | None, mode: str, group: str, job_type: str,
                 name: str, config: dict[str, Any]) -> None:
        import wandb

        self._wandb = wandb
        self._environ = job_environ(job_dir)
        offline = mode == "offline"
        settings = wandb.Settings(**BASE_SETTINGS, **(OFFLINE_SETTINGS if offline else {}))
        with scoped_environ({**self._environ, **(OFFLINE_ENVIRON if offline else {})}):
            if offline:
                # The global settings, which wandb's telemetry and its service follow, not just this run's.
                wandb.setup(settings=settings)
            self.run = wandb.init(
                dir=str(job_dir),
                project=project,
                entity=entity,
                mode=mode,
                group=group,
                job_type=job_type,
                name=name,
                id=content_hash({"group": group, "name": name, "job_type": job_type}, length=12),
                resume="allow",
                config=config,
                reinit="finish_previous",
                settings=settings,
            )

    def _safe(self, what: str, fn) -> None:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - logging must never break a job
            log.warning("W&B %s failed (%s); local results are unaffected", what, err)

    def log_scalars(self, values: dict[str, float], step: int | None = None) -> None:
        self._safe("log", lambda: self.run.log(values, step=step))

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        def log_rows() -> None:
            columns = sorted({key for row in rows for key in row})
            table = self._wandb.Table(columns=columns, data=[[_plain(row.get(c)) for c in columns] for row in rows])
            self.run.log({name: table})

        if rows:
            self._safe("table", log_rows)

    def log_image(self, name: str, path: Path) -> None:
        self._safe("image", lambda: self.run.log({name: self._wandb.Image(str(path))}))

    def log_artifact(self, name: str, paths: list[Path], kind: str) -> None:
        def log_files() -> None:
            with scoped_environ(self._environ):  # staged copies go to the job dir, not the home dir
                artifact = self._wandb.Artifact(name=name, type=kind)
                for path in paths:
                    artifact.add_file(str(path))
                self.run.log_artifact(artifact)

        self._safe("artifact", log_files)

    def close(self, failed: bool = False) -> None:
        self._safe("finish", lambda: self.run.finish(exit_code=1 if failed else 0))


def _plain(value: Any) -> Any:
    if isinstance(value, (list, dict, tuple)):
        import json

        return json.dumps(value, default=str)
    return value


def make_logger(cfg, job_dir: Path, group: str, job_type: str, name: str, config: dict[str, Any]) -> RunLogger:
    if cfg.name == "none":
        return NullLogger()
    if cfg.name != "wandb":
        from core.errors import ConfigError

        raise ConfigError("logger.name", cfg.name, "unknown logger", hint="use logger=wandb or logger=none")
    try:
        return WandbLogger(job_dir, cfg.project, cfg.entity, cfg.mode, group, job_type, name, config)
    except Exception as err:  # noqa: BLE001
        log.warning("W&B could not start (%s); continuing with local results only", err)
        return NullLogger()
