"""Stage ``evaluate``: both-sided scores of the unedited model (the baseline row of every table).

A thin wrapper over ``metrics.evaluation`` (a notebook calls the same functions): take the first
``n_cases`` facts of the dataset (optionally only those the model knows), score both sides, and
write ``cases.jsonl`` (one flat row per case), ``aggregates.json`` and ``table.md``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from core.errors import ConfigError
from core.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from facts.relations import load_relation_table
from metrics.aggregate import aggregate
from metrics.evaluation import evaluate_cases, evaluation_rows, prepare_cases
from metrics.report import render_markdown
from pipeline.stages.common import load_configured_facts, load_configured_model

log = logging.getLogger(__name__)


@dataclass
class EvaluateStageConfig:
    name: str = "evaluate"
    # First N cases of the dataset (after the known filter); fewer if the dataset is smaller.
    n_cases: int = 200
    # Keep only facts whose object the model predicts greedily (facts.knowledge, cached).
    known_only: bool = False
    # (prompt, candidate) rows per forward pass.
    batch_size: int = 256
    # Cap on the extra entity-side paraphrases drawn from the relation's templates (null: all).
    max_template_paraphrases: Optional[int] = None
    n_resamples: int = 1000
    confidence: float = 0.95
    progress: bool = True

    def validate(self) -> None:
        for key in ("n_cases", "batch_size", "n_resamples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"stage.{key}", getattr(self, key), "must be >= 1")
        if not 0 < self.confidence < 1:
            raise ConfigError("stage.confidence", self.confidence, "must be in (0, 1)", hint="e.g. 0.95")
        if self.max_template_paraphrases is not None and self.max_template_paraphrases < 0:
            raise ConfigError("stage.max_template_paraphrases", self.max_template_paraphrases, "must be >= 0",
                              hint="use null for all templates")


def run(cfg: DictConfig, job_dir: Path, logger) -> dict:
    settings: EvaluateStageConfig = OmegaConf.to_object(cfg.stage)
    settings.validate()
    started = time.time()
    loaded = load_configured_model(cfg)
    facts = list(load_configured_facts(cfg))
    if not any(fact.target_new for fact in facts):
        raise ConfigError("dataset", cfg.dataset.name, "has no new objects (o*) to compare with the true ones",
                          hint="use dataset=counterfact or a user file with new objects")
    if settings.known_only:
        from facts.knowledge import known_facts

        facts = known_facts(loaded, facts, cfg.paths.cache_dir)
    if len(facts) < settings.n_cases:
        log.warning("dataset has %d usable facts, fewer than stage.n_cases=%d", len(facts), settings.n_cases)
    relations = load_relation_table()
    cases = prepare_cases(facts[: settings.n_cases], relations, max_template_paraphrases=settings.max_template_paraphrases)
    scoring = time.time()
    scores = evaluate_cases(loaded, cases, relations, batch_size=settings.batch_size, progress=settings.progress)
    score_seconds = time.time() - scoring
    rows = evaluation_rows(scores)
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
        "score_seconds": round(score_seconds, 2),
        "cases_per_second": round(len(rows) / score_seconds, 3) if score_seconds > 0 else None,
        "seconds": round(time.time() - started, 2),
        "files": ["cases.jsonl", "aggregates.json", "table.md"],
    }
    log.info("evaluated %d cases in %.1f s (%.2f cases/s)", len(rows), score_seconds, summary["cases_per_second"] or 0)
    return summary
