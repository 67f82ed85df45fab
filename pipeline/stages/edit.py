"""Stage ``edit``: edit N cases with ROME or MEMIT from the entity or relation perspective and
score every case before and after on both sides (``metrics.evaluation``).

ROME edits one case at a time and restores the model after scoring it; MEMIT edits
``edit_batch_size`` cases at once (scored together, then restored). Entity edits rewrite
(s, r) -> o*; relation edits rewrite (s, o*) -> r's phrase and (s, o) -> " None" (the authors'
RaKE requests); cases without a known relation id have no relation request and are skipped in
the relation perspective. Writes ``cases.jsonl`` (pre and post rows per case, plus the edit's
diagnostics), ``aggregates.json`` and ``table.md``.

Unless ``stage.quality.enabled=false``, each side's row also holds the model's own quality
(``pipeline.stages.quality``): ``quality.fluency`` of greedy generations from the case's prompts,
``quality.nll`` on a held-out WikiText slice, and the generations; a case is ``collapsed`` when
the edit moved either past its threshold (``metrics.quality.is_collapsed``). The table then adds
a ``quality`` side (fluency, NLL, collapse rate) and ``*_guarded`` rates and scores in which a
collapsed edit counts as a failure: a binary metric alone can be passed by a wrecked model
(o* and o both collapse, o* a little less). ``examples.md`` shows the first cases' generations.
"""

from __future__ import annotations

import logging
import shutil
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from core.errors import ConfigError
from core.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_json, read_jsonl
from core.memory import halving_map
from editors import EDITORS, build_editor, check_editor_config, entity_request, relation_request
from facts.relations import load_relation_table
from metrics.aggregate import aggregate
from metrics.evaluation import prepare_cases
from metrics.fields import EDIT_METRICS, EDIT_SCORES, GUARDED_RATES
from metrics.quality import guard_rows
from metrics.report import render_markdown
from models.load import LoadedModel
from pipeline.jobs import PROGRESS
from pipeline.stages.common import load_configured_facts, load_configured_model, with_load_summary
from pipeline.stages.config import EditStageConfig
from pipeline.stages.quality import COLLAPSED, GENERATIONS, QualityScorer, collapsed, render_examples
from pipeline.stages.scoring import score_cases, score_in_process

log = logging.getLogger(__name__)


class EditProgress:
    """Finished work of an unfinished edit job: the pre-edit rows and one file per edited group.

    A killed job resumes from here (each file is written atomically once its group is scored);
    ``run_job`` clears the directory when ``force=true``, and ``clear`` deletes it once the job's
    files are written. A group file is reused only if it holds the same case ids.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    PRE = "pre.jsonl"

    def pre(self, compute) -> list[dict[str, Any]]:
        path = self.directory / self.PRE
        if path.exists():
            return read_jsonl(path)
        rows = compute()
        atomic_write_jsonl(path, rows)
        return rows

    def stored_pre(self) -> Optional[list[dict[str, Any]]]:
        """The pre-edit rows, if they were scored (they depend on the cases and the model, not the editor)."""
        path = self.directory / self.PRE
        return read_jsonl(path) if path.exists() else None

    def seed_pre(self, rows: list[dict[str, Any]]) -> None:
        """Reuse pre-edit rows of the same cases and model (``stage=calibrate``: one scoring for every grid point)."""
        if not (self.directory / self.PRE).exists():
            atomic_write_jsonl(self.directory / self.PRE, rows)

    def group(self, index: int, case_ids: list, compute) -> list[tuple[dict, dict]]:
        path = self.directory / f"group_{index:05d}.json"
        if path.exists():
            stored = read_json(path)
            if stored["case_ids"] == case_ids:
                return [tuple(pair) for pair in stored["results"]]
        results = compute()
        atomic_write_json(path, {"case_ids": case_ids, "results": [list(pair) for pair in results]})
        return results


def run(cfg: DictConfig, job_dir: Path, logger) -> dict:
    settings: EditStageConfig = OmegaConf.to_object(cfg.stage)
    settings.validate()
    check_editor_config(OmegaConf.to_object(cfg.editor))  # before the model loads
    facts = load_configured_facts(cfg)  # before the model: a bad file fails in a second, not after a load
    loaded = load_configured_model(cfg)
    return with_load_summary(edit_cases(cfg, settings, loaded, list(facts), job_dir, logger), facts)


def _no_case_hint(cfg: DictConfig) -> str:
    if cfg.dataset.name == "user":
        return ("give each record of dataset.path a new_object and, for the relation perspective, a relation_id "
                "of facts/tables/relations.yaml")
    return "use dataset=counterfact (cases with new objects and relation ids)"


@dataclass
class EditOutcome:
    """What the edit stage computes: per case the ``pre`` and ``post`` rows and the ``edit`` info, the
    aggregate table (``metrics.aggregate.EvaluationTable``) and the job summary (``results.json``)."""

    rows: list[dict[str, Any]]
    table: Any
    summary: dict[str, Any]
    title: str
    cases: list

    def tidy(self) -> list[dict[str, Any]]:
        """One ``{case_id, when, metric, value}`` row per case, side (pre/post) and numeric metric."""
        return [{"case_id": row["case_id"], "when": when, "metric": metric, "value": float(value)}
                for row in self.rows for when in ("pre", "post") for metric, value in row[when].items()
                if metric != "case_id" and isinstance(value, (int, float)) and not isinstance(value, bool)]

    def markdown(self) -> str:
        return render_markdown(self.table, self.title)


def edit_cases(cfg: DictConfig, settings: EditStageConfig, loaded: LoadedModel, facts: list, job_dir: Path, logger) -> dict:
    """Edit the first ``settings.n_cases`` editable facts and score both sides pre and post (files in ``job_dir``)."""
    outcome = compute_edits(cfg, settings, loaded, facts, job_dir)
    rows, table, title, cases, summary = outcome.rows, outcome.table, outcome.title, outcome.cases, outcome.summary
    n_collapsed = summary["n_collapsed"]
    quality = settings.quality.enabled
    files = ["cases.jsonl", "aggregates.json", "table.md"]
    atomic_write_jsonl(job_dir / "cases.jsonl", rows)
    atomic_write_json(job_dir / "aggregates.json", {"title": title, "editor": summary["editor"],
                                                    "perspective": summary["perspective"], **table.to_dict()})
    atomic_write_text(job_dir / "table.md", render_markdown(table, title) + _collapse_note(settings, n_collapsed))
    if quality and settings.quality.n_examples:
        facts_by_id = {case.case_id: case.fact for case in cases}
        atomic_write_text(job_dir / "examples.md", render_examples(rows, facts_by_id, settings.quality.n_examples, title,
                                                                   settings.quality.collapse))
        files.append("examples.md")
    EditProgress(job_dir / PROGRESS).clear()
    logger.log_scalars({f"edit/{key}": value for key, value in table.scalars().items() if not math.isnan(value)})
    logger.log_table("edit/cases", [{"case_id": r["case_id"], **{f"post.{k}": v for k, v in r["post"].items()
                                                                 if k not in ("case_id", GENERATIONS)}} for r in rows])
    summary["files"] = files
    log.info("%s", render_markdown(table, title))
    return summary


def compute_edits(cfg: DictConfig, settings: EditStageConfig, loaded: LoadedModel, facts: list, job_dir: Path) -> EditOutcome:
    """The edit stage's computation: edit, score pre and post, aggregate; writes only resume files.

    Finished groups go to ``job_dir / PROGRESS`` (so a killed job resumes); ``edit_cases`` writes
    the job's files from the outcome, ``pipeline.api.edit_and_evaluate`` returns it to a notebook.
    """
    editor_config = OmegaConf.to_object(cfg.editor)
    if editor_config.name == "none":
        raise ConfigError("editor", "none", "the edit stage needs an editor", f"use editor={', '.join(sorted(EDITORS))}")
    perspective = cfg.perspective.name
    started = time.time()
    editor = build_editor(editor_config, cache_dir=cfg.paths.cache_dir, data_dir=cfg.paths.data_dir)
    n_loaded = len(facts)
    facts = [fact for fact in facts if fact.target_new]
    without_new = n_loaded - len(facts)
    if settings.known_only:
        from facts.knowledge import known_facts

        facts = known_facts(loaded, facts, cfg.paths.cache_dir)
    unknown = n_loaded - without_new - len(facts)
    relations = load_relation_table()
    if perspective == "relation":
        facts = [fact for fact in facts if fact.relation_id in relations]
    if not facts:
        why = f"of {n_loaded} facts, {without_new} have no new object, {unknown} are unknown to the model (stage.known_only)"
        if perspective == "relation":
            why += ", the rest have no relation id of facts/tables/relations.yaml"
        raise ConfigError("dataset", cfg.dataset.name, f"no case can be edited from the {perspective} perspective ({why})",
                          _no_case_hint(cfg))
    cases = prepare_cases(facts[: settings.n_cases], relations, max_template_paraphrases=settings.max_template_paraphrases)
    if len(cases) < settings.n_cases:
        log.warning("only %d editable cases (stage.n_cases=%d)", len(cases), settings.n_cases)

    def request(case):
        if perspective == "entity":
            return entity_request(case.fact)
        return relation_request(case.relation, lookup=settings.relation_lookup)

    progress = EditProgress(job_dir / PROGRESS)
    quality = QualityScorer(loaded, settings.quality, cfg.paths.cache_dir, cfg.paths.data_dir) if settings.quality.enabled else None

    def score_pre() -> list[dict[str, Any]]:
        rows = score_cases(loaded, OmegaConf.to_object(cfg.model), cases, relations, settings, cfg.paths.cache_dir)
        if quality is None:
            return rows
        return [{**row, **extra} for row, extra in zip(rows, quality.score(cases))]

    pre = progress.pre(score_pre)
    batch = settings.edit_batch_size or editor.default_edit_batch_size
    post: list[dict[str, Any]] = []
    edits: list[dict[str, Any]] = []
    edit_seconds = 0.0
    groups = [cases[i:i + batch] for i in range(0, len(cases), batch)]

    def edit_and_score(group: list) -> list[tuple[dict, dict]]:
        """One edit of ``group``, scored while in force, then restored: a (post row, edit info) per case."""
        with editor.apply(loaded, [request(case) for case in group]) as result:
            rows = score_in_process(loaded, group, relations, settings.batch_size)
            if quality is not None:  # while the edit is in force: one held-out NLL per edit
                rows = [{**row, **extra} for row, extra in zip(rows, quality.score(group))]
        return [(row, {**info, "case_id": case.case_id, "edit_seconds": result.seconds / len(group)})
                for case, row, info in zip(group, rows, result.infos)]

    for index, group in enumerate(tqdm(groups, desc=f"{editor_config.name} {perspective}", disable=not settings.progress)):
        done = progress.group(index, [case.case_id for case in group],
                              lambda: halving_map(edit_and_score, group, len(group), what="stage.edit_batch"))
        post += [row for row, _ in done]
        edits += [info for _, info in done]
        edit_seconds += sum(info["edit_seconds"] for _, info in done)
    by_case = {row["case_id"]: row for row in post}
    edit_of = {row["case_id"]: row for row in edits}
    if quality is not None:
        pre, post, table, n_collapsed = _guarded_table(pre, by_case, settings, cfg.seed)
        by_case = {row["case_id"]: row for row in post}
    else:
        table, n_collapsed = aggregate(pre, post, n_resamples=settings.n_resamples, confidence=settings.confidence,
                                       seed=cfg.seed), None
    name = loaded.identity.get("name", cfg.model.name)
    title = f"{editor_config.name} {perspective} edits of {name} on {cfg.dataset.name} ({len(cases)} cases)"
    rows = [{"case_id": row["case_id"], "pre": row, "post": by_case[row["case_id"]], "edit": edit_of[row["case_id"]],
             **({"collapsed": bool(by_case[row["case_id"]][COLLAPSED])} if quality is not None else {})} for row in pre]
    summary = {
        "model": name, "dataset": cfg.dataset.name, "editor": editor_config.name, "perspective": perspective,
        "layers": list(editor_config.layers), "n_cases": len(cases), "edit_batch_size": batch,
        "relation_lookup": settings.relation_lookup if perspective == "relation" else None,
        "pre": {row.metric: row.pre.mean for row in table.rows},
        "post": {row.metric: row.post.mean for row in table.rows if row.post is not None},
        "seconds_per_edit": round(edit_seconds / len(groups), 3),
        "seconds_per_case": round(edit_seconds / len(cases), 3),
        "seconds": round(time.time() - started, 2),
        "n_collapsed": n_collapsed,
    }
    return EditOutcome(rows=rows, table=table, summary=summary, title=title, cases=cases)


def _guarded_table(pre: list[dict[str, Any]], post_by_case: dict[Any, dict[str, Any]], settings: EditStageConfig,
                   seed: int) -> tuple[list[dict], list[dict], Any, int]:
    """Flag collapsed edits, add the ``*_guarded`` rates (collapsed = failure) and aggregate everything.

    Pre-edit rows get ``quality.collapsed = 0`` (nothing was edited yet), so the post row of that
    metric is the collapse rate and its delta is paired like every other metric.
    """
    flags = {row["case_id"]: collapsed(row, post_by_case[row["case_id"]], settings.quality.collapse) for row in pre}
    pre = guard_rows([{**row, COLLAPSED: 0.0} for row in pre], {}, GUARDED_RATES)
    post = guard_rows([{**post_by_case[row["case_id"]], COLLAPSED: float(flags[row["case_id"]])} for row in pre], flags,
                      GUARDED_RATES)
    table = aggregate(pre, post, metrics=EDIT_METRICS, scores=EDIT_SCORES, n_resamples=settings.n_resamples,
                      confidence=settings.confidence, seed=seed)
    n_collapsed = sum(flags.values())
    table.counts["n_collapsed"] = n_collapsed
    return pre, post, table, n_collapsed


def _collapse_note(settings: EditStageConfig, n_collapsed: Optional[int]) -> str:
    if n_collapsed is None:
        return ""
    thresholds = settings.quality.collapse
    return (f"\nCollapsed edits: {n_collapsed}. An edit collapses when the held-out NLL rises by more than "
            f"{thresholds.max_nll_increase} nats/token or fluency falls by more than {thresholds.max_fluency_drop:.0%} "
            "(stage.quality.collapse). The plain rates count every edit as measured; the `*_guarded` rates and "
            "scores count a collapsed edit as a failure, so a broken model is never a success there.\n")
