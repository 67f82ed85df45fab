"""Stage ``edit``: edit N cases with ROME or MEMIT from the entity or relation perspective and
score every case before and after on both sides (``metrics.evaluation``).

ROME edits one case at a time and restores the model after scoring it; MEMIT edits
``edit_batch_size`` cases at once (scored together, then restored). Entity edits rewrite
(s, r) -> o*; relation edits rewrite (s, o*) -> r's phrase and (s, o) -> " None" (the authors'
RaKE requests); cases without a known relation id have no relation request and are skipped in
the relation perspective. Writes ``cases.jsonl`` (pre and post rows per case, plus the edit's
diagnostics), ``aggregates.json`` and ``table.md``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from core.errors import ConfigError
from core.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from editors import build_editor, entity_request, relation_request
from editors.requests import LOOKUPS
from facts.relations import load_relation_table
from metrics.aggregate import aggregate
from metrics.evaluation import evaluate_cases, evaluation_rows, prepare_cases
from metrics.report import render_markdown
from pipeline.stages.common import load_configured_facts, load_configured_model

log = logging.getLogger(__name__)


@dataclass
class EditStageConfig:
    name: str = "edit"
    # First N cases of the dataset (after the known filter and, for relation edits, those with a relation).
    n_cases: int = 100
    known_only: bool = False
    # Cases per edit: null = the editor's default (ROME 1: one edit, scored, restored; MEMIT 100).
    edit_batch_size: Optional[int] = None
    # Relation perspective: key/lookup token of relation edits (subject_last as the authors; or prompt_last).
    relation_lookup: str = "subject_last"
    # Evaluation (metrics.evaluation / metrics.aggregate).
    batch_size: int = 256
    max_template_paraphrases: Optional[int] = None
    n_resamples: int = 1000
    confidence: float = 0.95
    progress: bool = True

    def validate(self) -> None:
        for key in ("n_cases", "batch_size", "n_resamples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"stage.{key}", getattr(self, key), "must be >= 1")
        if self.edit_batch_size is not None and self.edit_batch_size < 1:
            raise ConfigError("stage.edit_batch_size", self.edit_batch_size, "must be >= 1 or null")
        if self.relation_lookup not in LOOKUPS:
            raise ConfigError("stage.relation_lookup", self.relation_lookup, "unknown lookup", f"use one of {', '.join(LOOKUPS)}")


def run(cfg: DictConfig, job_dir: Path, logger) -> dict:
    settings: EditStageConfig = OmegaConf.to_object(cfg.stage)
    settings.validate()
    editor_config = OmegaConf.to_object(cfg.editor)
    if editor_config.name == "none":
        raise ConfigError("editor", "none", "the edit stage needs an editor", "use editor=rome or editor=memit")
    perspective = cfg.perspective.name
    started = time.time()
    loaded = load_configured_model(cfg)
    editor = build_editor(editor_config, cache_dir=cfg.paths.cache_dir, data_dir=cfg.paths.data_dir)
    facts = [fact for fact in load_configured_facts(cfg) if fact.target_new]
    if settings.known_only:
        from facts.knowledge import known_facts

        facts = known_facts(loaded, facts, cfg.paths.cache_dir)
    relations = load_relation_table()
    if perspective == "relation":
        facts = [fact for fact in facts if fact.relation_id in relations]
    if not facts:
        raise ConfigError("dataset", cfg.dataset.name, f"no case can be edited from the {perspective} perspective",
                          "use dataset=counterfact (cases with new objects and relation ids)")
    cases = prepare_cases(facts[: settings.n_cases], relations, max_template_paraphrases=settings.max_template_paraphrases)
    if len(cases) < settings.n_cases:
        log.warning("only %d editable cases (stage.n_cases=%d)", len(cases), settings.n_cases)

    def request(case):
        if perspective == "entity":
            return entity_request(case.fact)
        return relation_request(case.relation, lookup=settings.relation_lookup)

    scoring = dict(relations=relations, batch_size=settings.batch_size)
    pre = evaluation_rows(evaluate_cases(loaded, cases, progress=settings.progress, **scoring))
    batch = settings.edit_batch_size or editor.default_edit_batch_size
    post: list[dict[str, Any]] = []
    edits: list[dict[str, Any]] = []
    edit_seconds = 0.0
    groups = [cases[i:i + batch] for i in range(0, len(cases), batch)]
    for group in tqdm(groups, desc=f"{editor_config.name} {perspective}", disable=not settings.progress):
        with editor.apply(loaded, [request(case) for case in group]) as result:
            post += evaluation_rows(evaluate_cases(loaded, group, progress=False, **scoring))
        edit_seconds += result.seconds
        for case, info in zip(group, result.infos):
            edits.append({**info, "case_id": case.case_id, "edit_seconds": result.seconds / len(group)})
    table = aggregate(pre, post, n_resamples=settings.n_resamples, confidence=settings.confidence, seed=cfg.seed)
    name = loaded.identity.get("name", cfg.model.name)
    title = f"{editor_config.name} {perspective} edits of {name} on {cfg.dataset.name} ({len(cases)} cases)"
    by_case = {row["case_id"]: row for row in post}
    edit_of = {row["case_id"]: row for row in edits}
    rows = [{"case_id": row["case_id"], "pre": row, "post": by_case[row["case_id"]], "edit": edit_of[row["case_id"]]}
            for row in pre]
    atomic_write_jsonl(job_dir / "cases.jsonl", rows)
    atomic_write_json(job_dir / "aggregates.json", {"title": title, "editor": editor_config.name,
                                                    "perspective": perspective, **table.to_dict()})
    atomic_write_text(job_dir / "table.md", render_markdown(table, title))
    logger.log_scalars({f"edit/{key}": value for key, value in table.scalars().items() if not math.isnan(value)})
    logger.log_table("edit/cases", [{"case_id": r["case_id"], **{f"post.{k}": v for k, v in r["post"].items() if k != "case_id"}}
                                     for r in rows])
    summary = {
        "model": name, "dataset": cfg.dataset.name, "editor": editor_config.name, "perspective": perspective,
        "layers": list(editor_config.layers), "n_cases": len(cases), "edit_batch_size": batch,
        "relation_lookup": settings.relation_lookup if perspective == "relation" else None,
        "pre": {row.metric: row.pre.mean for row in table.rows},
        "post": {row.metric: row.post.mean for row in table.rows if row.post is not None},
        "seconds_per_edit": round(edit_seconds / len(groups), 3),
        "seconds_per_case": round(edit_seconds / len(cases), 3),
        "seconds": round(time.time() - started, 2),
        "files": ["cases.jsonl", "aggregates.json", "table.md"],
    }
    log.info("%s", render_markdown(table, title))
    return summary
