"""The one front door: ``load_facts(cfg, data_dir, cache_dir) -> FactSet``.

Reads the configured source (explicit path > data dir > bundle > cache/download), parses every
record through the shared validation, and either raises on the first malformed record
(``strict=true``) or skips and counts it, logging one warning with the count. Any unexpected
exception inside a record is turned into a DataError with the case id, so a load never dies
halfway without saying which record broke it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from core.checks import check_choice
from core.errors import DataError
from core.paths import existing_file
from facts import counterfact, known, user
from facts.config import DatasetConfig
from facts.relations import load_relation_table, load_template_table
from facts.schema import Fact, FactSet, LoadReport
from facts.sources import Resolved, identify, resolve
from facts.validate import check_unique_case_ids

log = logging.getLogger(__name__)

MEND_SPLITS = ("edit", "train", "val")


def load_facts(
    cfg: DatasetConfig,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    fetch: Optional[Callable[[str], bytes]] = None,
) -> FactSet:
    """Load, validate and report the facts named by ``cfg`` (see DatasetConfig)."""
    cfg.validate()
    relation_ids = frozenset(load_relation_table())
    if cfg.name == "known":
        _formats(cfg, ("auto", "known"))
        resolved = identify(cfg.path, ("known_1000",)) if cfg.path else resolve("known_1000", data_dir=data_dir)
        rows = _limit(list(enumerate(resolved.json())), cfg.limit)
        return _collect(rows, lambda i, r: known.parse_known(r, relation_ids, i), cfg, resolved, known.record_case_id)
    if cfg.name == "user":
        _formats(cfg, ("auto", "jsonl"))
        text = _read_user(cfg.path)
        rows = _limit(list(user.iter_jsonl(text)), cfg.limit)
        origin = Resolved("user", "path", str(cfg.path), b"")
        return _collect(rows, lambda i, r: user.parse_user(r, relation_ids, i), cfg, origin, user.record_case_id)
    return _load_counterfact(cfg, data_dir, cache_dir, relation_ids, fetch)


def _load_counterfact(cfg, data_dir, cache_dir, relation_ids, fetch) -> FactSet:
    _formats(cfg, ("auto", "mend", "rome"))
    wants_rome = cfg.format == "rome" or cfg.download
    if cfg.path:
        resolved = identify(cfg.path, ("counterfact_rome",) + tuple(f"counterfact_mend/{s}" for s in MEND_SPLITS))
        sources = [resolved]
    elif wants_rome:
        sources = [resolve("counterfact_rome", data_dir=data_dir, cache_dir=cache_dir, download=cfg.download, fetch=fetch)]
    else:
        splits = MEND_SPLITS if cfg.split == "all" else (cfg.split,)
        sources = [resolve(f"counterfact_mend/{s}", data_dir=data_dir) for s in splits]
    records: list[tuple[str, Any]] = [(src.name, row) for src in sources for row in src.json()]
    fmt = counterfact.detect_format([row for _, row in records[:1]]) if cfg.format == "auto" else cfg.format
    if fmt == "rome" and cfg.split != "all":
        keep = {row["case_id"] for row in resolve(f"counterfact_mend/{cfg.split}", data_dir=data_dir).json()}
        records = [(name, row) for name, row in records if counterfact.record_case_id(row, -1) in keep]
    rows = _limit(list(enumerate(records)), cfg.limit)
    if fmt == "rome":
        parse = lambda i, item: counterfact.parse_rome(item[1], relation_ids, item[0], i)  # noqa: E731
    else:
        table = load_template_table()
        parse = lambda i, item: counterfact.parse_mend(item[1], table, relation_ids, item[0], i)  # noqa: E731
    case_id_of = lambda item, i: counterfact.record_case_id(item[1], i)  # noqa: E731
    name = "+".join(src.name for src in sources)
    facts = _collect(rows, parse, cfg, sources[0], case_id_of, name)
    if cfg.name == "counterfact_relation":
        return _only_with_relation(facts)
    return facts


def _collect(
    rows: Iterable[tuple[int, Any]], parse, cfg: DatasetConfig, resolved: Resolved, case_id_of, name: str = ""
) -> FactSet:
    report = LoadReport(source=name or resolved.name, origin=f"{resolved.origin}:{resolved.location}")
    facts: list[Fact] = []
    for index, row in rows:
        report.read += 1
        try:
            fact = parse(index, row)
        except DataError as error:
            _skip(report, error, cfg.strict)
            continue
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # malformed beyond the checks: still name the case
            error = DataError("record", type(exc).__name__, f"malformed record ({exc})",
                              "fix or remove the record", case_id=case_id_of(row, index))
            if cfg.strict:
                raise error from exc
            _skip(report, error, strict=False)
            continue
        facts.append(fact)
    return _require_unique(_require_some(_finish(FactSet(facts, report)), cfg), cfg)


def _skip(report: LoadReport, error: DataError, strict: bool) -> None:
    if strict:
        raise error
    report.skipped += 1
    report.errors.append(error.to_dict())


def _finish(facts: FactSet) -> FactSet:
    report = facts.report
    report.loaded = len(facts.facts)
    report.without_relation_id = sum(1 for f in facts.facts if f.relation_id is None)
    counts: dict[str, int] = {}
    for fact in facts.facts:
        if fact.relation_id:
            counts[fact.relation_id] = counts.get(fact.relation_id, 0) + 1
    report.relation_counts = dict(sorted(counts.items()))
    if report.skipped:
        log.warning("%s: skipped %d of %d records as malformed (%s; first: %s); strict=true raises instead",
                    report.source, report.skipped, report.read, _reasons(report), report.errors[0]["message"])
    log.info("%s: loaded %d facts from %s; relation id known for %.1f%%",
             report.source, report.loaded, report.origin, 100 * report.relation_coverage)
    return facts


def _reasons(report: LoadReport) -> str:
    return ", ".join(f"{count} x {reason}" for reason, count in report.skip_reasons().items())


def _require_some(facts: FactSet, cfg: DatasetConfig) -> FactSet:
    """An empty or entirely skipped load is an error here, where the file and the reasons are known.

    Otherwise a stage later reports "no case can be edited" or "the model knows none of 0 facts"
    with a hint to use another dataset, which hides that every record of the user's file was
    rejected (and why). ``dataset.limit=0`` asks for nothing and gets nothing.
    """
    report = facts.report
    if facts.facts or cfg.limit == 0:
        return facts
    key, value = ("dataset.path", cfg.path) if cfg.path else ("dataset", cfg.name)
    if report.read == 0:
        raise DataError(key, value, "holds no records", "put one JSON record per line (see conf/dataset/user.yaml)"
                        if cfg.name == "user" else "point it at a non-empty data file")
    raise DataError(key, value, f"all {report.read} records were skipped as malformed ({_reasons(report)})",
                    f"fix the records (first: {report.errors[0]['message']}); dataset.strict=true stops at the first")


def _require_unique(facts: FactSet, cfg: DatasetConfig) -> FactSet:
    check_unique_case_ids(facts.facts, f"dataset.path={cfg.path}" if cfg.path else f"dataset={cfg.name}")
    return facts


def _only_with_relation(facts: FactSet) -> FactSet:
    """counterfact_relation keeps cases with a relation id; the rest are counted, not errors."""
    kept = [f for f in facts.facts if f.relation_id is not None]
    dropped = len(facts.facts) - len(kept)
    if dropped:
        log.warning("%s: %d cases without a relation id are left out of the relation perspective", facts.report.source, dropped)
    facts.report.loaded = len(kept)
    facts.report.without_relation_id = 0
    facts.report.skipped_without_relation = dropped
    return FactSet(kept, facts.report)


def _limit(rows: list, limit: Optional[int]) -> list:
    return rows if limit is None else rows[:limit]


def _formats(cfg: DatasetConfig, allowed: tuple[str, ...]) -> None:
    check_choice("dataset.format", cfg.format, allowed, f"not valid for dataset={cfg.name}")


def _read_user(path: Optional[str]) -> str:
    if not path:
        raise DataError("dataset.path", path, "dataset=user needs a file", "point dataset.path at a jsonl file")
    existing_file("dataset.path", path, DataError, "point dataset.path at a jsonl file")
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError("dataset.path", path, f"cannot read ({exc})", "use a UTF-8 jsonl file") from exc

