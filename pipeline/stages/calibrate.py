"""Stage ``calibrate``: search the editor's own knobs on training cases and propose the winner's config.

For each point of the grid (``pipeline.stages.grid``: ``stage.search.<editor>``, ``auto`` layers
sized from the model), edit the first ``n_cases`` editable facts of ``stage.dataset`` (CounterFact's
train split: never the cases ``stage=edit`` evaluates) from the entity perspective and score them as
the edit stage does (``compute_edits``: reliability, generality, locality, fluency, NLL, collapse).
The winner is the eligible point (``metrics.calibration``: the fluency floor) with the largest
harmonic mean of reliability, generality and locality. The MLP AIE by layer of an entity trace
(``stage.trace_dir``, or traced here on the same facts) goes beside the scores.

Resumable like every stage: the unedited model is scored once (``progress/pre.jsonl``), each
finished point is one atomic file (``progress/points/``) and a point in progress keeps its finished
edit groups (``progress/point_<i>/``); a finished job is skipped. Writes ``calibration.{csv,md}``,
``calibration.{png,pdf}``, ``points.jsonl`` (per point and case, the post-edit rows) and
``<editor>_<model>.yaml`` (install: ``python -m pipeline.calibrate_install <job dir>``).
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from core.errors import ConfigError, DataError
from core.io import atomic_write_json, atomic_write_jsonl, load_tensors, read_json
from editors import check_editor_config
from metrics.aggregate import harmonic_mean
from metrics.calibration import Eligibility, fluency_drop, ineligible_reason
from pipeline.jobs import PROGRESS
from pipeline.stages.common import load_configured_facts, load_configured_model, with_load_summary
from pipeline.stages.config import CalibrateStageConfig
from pipeline.stages.edit import EditProgress, compute_edits
from pipeline.stages.grid import GridPoint, check_space, expand, point_configs, search_space
from pipeline.stages.quality import GENERATIONS

log = logging.getLogger(__name__)

# Column -> the edit stage's metric (post-edit mean unless the column says pre).
METRICS = {"reliability": "entity.reliability", "generality": "entity.generality", "locality": "entity.locality",
           "fluency": "quality.fluency", "nll": "quality.nll", "collapse_rate": "quality.collapsed"}
TRACE = "trace"


def run(cfg: DictConfig, job_dir: Path, logger) -> dict:
    settings: CalibrateStageConfig = OmegaConf.to_object(cfg.stage)
    settings.validate()
    if cfg.perspective.name != "entity":
        raise ConfigError("perspective", cfg.perspective.name, "calibration scores entity edits (efficacy, "
                          "paraphrase, neighbourhood)", "use perspective=entity")
    editor = OmegaConf.to_object(cfg.editor)
    check_editor_config(editor)
    space = search_space(settings.search, editor.name)
    check_space(space, cfg.editor, editor.name)  # before the model loads: a typo'd knob costs nothing
    aie_file = _trace_file(settings.trace_dir) if settings.trace_dir else None
    facts = load_configured_facts(cfg, dataset=settings.dataset)
    loaded = load_configured_model(cfg)
    n_layers = loaded.adapter.n_layers
    points = expand(space, n_layers, settings.auto_points, settings.auto_window.get(editor.name, 1))
    configs = point_configs(cfg.editor, points, editor.name, n_layers)  # every point valid before any edit
    log.info("calibrate %s on %s: %d grid points x %d cases", editor.name, cfg.model.name, len(points), settings.n_cases)

    aie, trace_info = _mlp_aie(cfg, settings, loaded, list(facts), job_dir, logger, aie_file, n_layers)
    records = _score_points(cfg, settings, loaded, list(facts), points, configs, job_dir)

    from pipeline.stages.calibration_report import write_report

    summary = write_report(job_dir, records, points, aie, trace_info, settings, editor.name, cfg.model.name,
                           base_config=_editor_model_file(editor.name, cfg.model.name))
    EditProgress(job_dir / PROGRESS).clear()
    logger.log_table("calibrate/points", [{k: v for k, v in r.items() if k != "values"} for r in records])
    logger.log_image("calibrate/calibration", job_dir / "calibration.png")
    return with_load_summary(summary, facts)


# -- the grid -----------------------------------------------------------------------------------------
class PointProgress:
    """One atomic file per finished grid point, reused only for the same knob values."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def get(self, point: GridPoint, compute) -> dict[str, Any]:
        path = self.directory / f"point_{point.index:04d}.json"
        if path.exists():
            stored = read_json(path)
            if stored["record"]["values"] == point.values:
                return stored
        result = compute()
        atomic_write_json(path, result)
        return result


def _score_points(cfg: DictConfig, settings: CalibrateStageConfig, loaded, facts: list, points: list[GridPoint],
                  configs: list, job_dir: Path) -> list[dict[str, Any]]:
    """Each point's record (csv row); its per-case rows go to ``points.jsonl``."""
    progress = job_dir / PROGRESS
    shared = EditProgress(progress)  # the unedited model's rows: scored at the first point, reused by all
    finished = PointProgress(progress / "points")
    edit_settings = settings.edit_settings()
    rule = Eligibility(settings.max_fluency_drop, settings.max_collapse_rate)
    records, case_rows = [], []
    for point, (node, _) in zip(points, configs):
        def compute(point=point, node=node) -> dict[str, Any]:
            point_dir = progress / f"point_{point.index:04d}"
            pre = shared.stored_pre()
            if pre is not None:
                EditProgress(point_dir / PROGRESS).seed_pre(pre)
            point_cfg = copy.deepcopy(cfg)
            point_cfg.editor = node
            point_cfg.dataset = OmegaConf.structured(settings.dataset)
            started = time.time()
            outcome = compute_edits(point_cfg, edit_settings, loaded, facts, point_dir)
            if pre is None:
                shared.seed_pre(EditProgress(point_dir / PROGRESS).stored_pre())
            record = _record(point, outcome, rule, time.time() - started)
            rows = [{"point": point.index, "case_id": row["case_id"], "collapsed": row.get("collapsed"),
                     **{k: v for k, v in row["post"].items() if k not in ("case_id", GENERATIONS)}} for row in outcome.rows]
            shutil.rmtree(point_dir, ignore_errors=True)
            return {"record": record, "rows": rows}

        done = finished.get(point, compute)
        log.info("point %d/%d %s: score %.3f%s", point.index + 1, len(points), point.label, done["record"]["score"],
                 "" if done["record"]["eligible"] else f" (ineligible: {done['record']['ineligible']})")
        records.append(done["record"])
        case_rows += done["rows"]
    atomic_write_jsonl(job_dir / "points.jsonl", case_rows)
    return records


def _record(point: GridPoint, outcome, rule: Eligibility, seconds: float) -> dict[str, Any]:
    """The point's means (post-edit unless named ``*_pre``), harmonic mean, fluency drop and eligibility."""
    table = outcome.table
    record: dict[str, Any] = {"point": point.index, "label": point.label, "values": point.values}
    for column, metric in METRICS.items():
        row = table.row(metric)
        record[column] = row.post.mean
        if column in ("locality", "fluency", "nll"):
            record[f"{column}_pre"] = row.pre.mean
    record["score"] = harmonic_mean([record["reliability"], record["generality"], record["locality"]])
    record["locality_drop"] = record["locality_pre"] - record["locality"]
    record["fluency_drop"] = fluency_drop(record["fluency_pre"], record["fluency"])
    reason = ineligible_reason(record["fluency_drop"], record["collapse_rate"], rule)
    record["eligible"], record["ineligible"] = reason is None, reason or ""
    record["n_cases"] = outcome.summary["n_cases"]
    record["seconds_per_edit"] = outcome.summary["seconds_per_edit"]
    record["seconds"] = round(seconds, 2)
    return record


def _editor_model_file(editor: str, model: str) -> Optional[Path]:
    from core.conf import CONF_DIR

    path = CONF_DIR / "editor_model" / f"{editor}_{model}.yaml"
    return path if path.exists() else None


# -- the MLP AIE by layer -------------------------------------------------------------------------------
def _trace_file(trace_dir: str) -> Path:
    """``aie.safetensors`` of a finished trace job dir (or of a full job's ``trace/`` step)."""
    root = Path(trace_dir)
    for candidate in (root / "aie.safetensors", root / TRACE / "aie.safetensors"):
        if candidate.is_file():
            results = candidate.parent / "results.json"
            perspective = read_json(results)["results"].get("perspective") if results.exists() else None
            if perspective not in (None, "entity"):
                raise ConfigError("stage.trace_dir", trace_dir, f"is a {perspective} trace", "give an entity trace job dir")
            return candidate
    raise ConfigError("stage.trace_dir", trace_dir, "holds no aie.safetensors (not a finished trace job dir)",
                      "run python -m pipeline.run stage=trace perspective=entity, or leave stage.trace_dir=null")


def _mlp_aie(cfg: DictConfig, settings: CalibrateStageConfig, loaded, facts: list, job_dir: Path, logger,
             aie_file: Optional[Path], n_layers: int) -> tuple[Optional[list[float]], dict[str, Any]]:
    """MLP AIE of ``settings.aie_role`` by layer, from ``aie_file`` or a small trace of the known facts here."""
    from tracing.spans import ROLES

    info: dict[str, Any] = {"role": settings.aie_role}
    if aie_file is None:
        if "mlp" not in settings.trace.kinds:
            raise ConfigError("stage.trace.kinds", settings.trace.kinds, "the figure needs the MLP trace", "include mlp")
        from pipeline.stages.trace import trace_known_facts

        try:
            traced = trace_known_facts(cfg, settings.trace, loaded, facts, settings.dataset.name, job_dir / TRACE, logger)
        except DataError as err:  # e.g. a random test model knows none of the facts: the scores stand alone
            log.warning("no MLP trace for the figure: %s", err)
            return None, {**info, "source": None, "why_none": str(err)}
        aie_file = job_dir / TRACE / "aie.safetensors"
        info |= {"source": f"{TRACE}/ (traced here)", "n_facts": traced["n_traced"]}
    else:
        info["source"] = str(aie_file.parent)
    tensors = load_tensors(aie_file)
    if "mlp.mean" not in tensors:
        raise DataError("stage.trace_dir", str(aie_file.parent), "has no MLP trace", "trace with stage.kinds including mlp")
    mean = tensors["mlp.mean"][ROLES.index(settings.aie_role)]  # [layer]
    if mean.shape[0] != n_layers:
        raise DataError("stage.trace_dir", str(aie_file.parent), f"traces {mean.shape[0]} layers, the model has {n_layers}",
                        "give a trace of the same model")
    return [float(value) for value in mean], info

