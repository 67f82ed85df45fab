"""Stage ``full`` (the default): one model x editor x perspective x dataset, end to end.

1. **Known facts and causal trace** of the perspective, on ``stage.trace_dataset`` (ROME's known
   facts): both reuse the content-addressed caches (known-fact table, per-fact traces), whose
   locks make parallel jobs of a sweep wait for one another instead of computing twice; the AIE
   tensors and figures go to ``trace/`` and to the job's W&B run.
2. **Edits** of ``dataset`` cases by ``editor`` from the perspective, every case scored on both
   sides before and after (``edit/``: cases.jsonl, aggregates.json, table.md; W&B scalars/tables).

Each step writes ``<step>/results.json`` when it finishes, so a killed job redoes only the steps
(and, within the edit step, the edit groups) it lacks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from core.io import atomic_write_json, read_json
from editors import check_editor_config
from pipeline.jobs import RESULTS
from pipeline.stages.common import load_configured_facts, load_configured_model, with_load_summary
from pipeline.stages.config import FullStageConfig
from pipeline.stages.edit import edit_cases
from pipeline.stages.trace import trace_known_facts

log = logging.getLogger(__name__)


def run(cfg: DictConfig, job_dir: Path, logger) -> dict:
    settings: FullStageConfig = OmegaConf.to_object(cfg.stage)
    settings.edit.validate("stage.edit")
    settings.trace.trace_settings(int(cfg.seed), "stage.trace")  # validates before anything is loaded
    check_editor_config(OmegaConf.to_object(cfg.editor))
    started = time.time()
    force = bool(cfg.get("force", False))
    edits = settings.run_edit and cfg.editor.name != "none"
    # Facts before the model: a bad data file fails in a second, not after a model load.
    trace_facts = load_configured_facts(cfg, settings.trace_dataset) if settings.run_trace else None
    edit_facts = load_configured_facts(cfg) if edits else None
    loaded = load_configured_model(cfg)
    summary: dict = {"model": loaded.identity["name"], "editor": cfg.editor.name, "perspective": cfg.perspective.name,
                     "dataset": cfg.dataset.name}
    if trace_facts is not None:
        def trace_step(directory: Path) -> dict:
            traced = trace_known_facts(cfg, settings.trace, loaded, list(trace_facts), settings.trace_dataset.name,
                                       directory, logger)
            return with_load_summary(traced, trace_facts)

        summary["trace"] = _step(job_dir / "trace", trace_step, force)
    if settings.run_edit and not edits:
        log.info("editor=none: tracing only")
    if edit_facts is not None:
        def edit_step(directory: Path) -> dict:
            return with_load_summary(edit_cases(cfg, settings.edit, loaded, list(edit_facts), directory, logger), edit_facts)

        summary["edit"] = _step(job_dir / "edit", edit_step, force)
    summary["seconds"] = round(time.time() - started, 2)
    return summary


def _step(directory: Path, compute: Callable[[Path], dict], force: bool) -> dict:
    """Run one step into ``directory`` unless its done-marker exists (a resumed job skips it)."""
    marker = directory / RESULTS  # the same done-marker name as a job's
    if marker.exists() and not force:
        log.info("step %s already done; reusing it", directory.name)
        return {**read_json(marker), "reused": True}
    directory.mkdir(parents=True, exist_ok=True)
    result = compute(directory)
    atomic_write_json(marker, result)
    return result
