"""Stage ``evaluate``: both-sided scores of the unedited model (the baseline row of every table).

A thin wrapper over ``metrics.evaluation`` (a notebook calls the same functions): take the first
``n_cases`` facts of the dataset (optionally only those the model knows), score both sides, and
write ``cases.jsonl`` (one flat row per case), ``aggregates.json`` and ``table.md``. With
``stage.fabric.devices=N`` the cases are sharded over N devices (same rows as one process).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from core.errors import ConfigError
from core.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from facts.relations import load_relation_table
from metrics.aggregate import aggregate
from metrics.evaluation import prepare_cases
from metrics.report import render_markdown
from pipeline.stages.common import load_configured_facts, load_configured_model, with_load_summary
from pipeline.stages.config import EvaluateStageConfig
from pipeline.stages.scoring import score_cases

log = logging.getLogger(__name__)


def run(cfg: DictConfig, job_dir: Path, logger) -> dict:
    settings: EvaluateStageConfig = OmegaConf.to_object(cfg.stage)
    settings.validate()
    started = time.time()
    loaded_facts = load_configured_facts(cfg)  # before the model: a bad file fails in a second, not after a load
    loaded = load_configured_model(cfg)
    facts = list(loaded_facts)
    if not any(fact.target_new for fact in facts):
        raise ConfigError("dataset", cfg.dataset.name, "has no new objects (o*) to compare with the true ones",
                          hint="give each record of dataset.path a new_object" if cfg.dataset.name == "user"
                          else "use dataset=counterfact or a user file with new objects")
    if settings.known_only:
        from facts.knowledge import known_facts

        facts = known_facts(loaded, facts, cfg.paths.cache_dir)
    if len(facts) < settings.n_cases:
        log.warning("dataset has %d usable facts, fewer than stage.n_cases=%d", len(facts), settings.n_cases)
    relations = load_relation_table()
    cases = prepare_cases(facts[: settings.n_cases], relations, max_template_paraphrases=settings.max_template_paraphrases)
    scoring = time.time()
    rows = score_cases(loaded, OmegaConf.to_object(cfg.model), cases, relations, settings, cfg.paths.cache_dir)
    score_seconds = time.time() - scoring
    table = aggregate(rows, None, n_resamples=settings.n_resamples, confidence=settings.confidence, seed=cfg.seed)
    title = f"Unedited {loaded.identity.get('name', cfg.model.name)} on {cfg.dataset.name} ({len(rows)} cases)"
    atomic_write_jsonl(job_dir / "cases.jsonl", rows)
    atomic_write_json(job_dir / "aggregates.json", {"title": title, **table.to_dict()})
    atomic_write_text(job_dir / "table.md", render_markdown(table, title))
    logger.log_scalars({f"evaluate/{key}": value for key, value in table.scalars().items() if not math.isnan(value)})
    logger.log_table("evaluate/cases", rows)
    summary = {
        "model": loaded.identity.get("name"),
        "dataset": cfg.dataset.name,
        "perspective": cfg.perspective.name,
        "n_cases": len(rows),
        "n_relation_side": table.counts["relation_side"],
        "n_without_relation": table.counts["without_relation"],
        "pre": {row.metric: row.pre.to_dict()["mean"] for row in table.rows},  # NaN -> None (strict JSON)
        "devices": settings.fabric.devices,
        "score_seconds": round(score_seconds, 2),
        "cases_per_second": round(len(rows) / score_seconds, 3) if score_seconds > 0 else None,
        "seconds": round(time.time() - started, 2),
        "files": ["cases.jsonl", "aggregates.json", "table.md"],
    }
    log.info("evaluated %d cases in %.1f s (%.2f cases/s)", len(rows), score_seconds, summary["cases_per_second"] or 0)
    return with_load_summary(summary, loaded_facts)
