"""Stage ``known``: which facts of the dataset does the model know? (cached per model)"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from core.io import atomic_write_jsonl
from facts.knowledge import knowledge_table
from pipeline.stages.config import KnownStageConfig
from pipeline.stages.common import load_configured_facts, load_configured_model, with_load_summary


def run(cfg: DictConfig, job_dir: Path, logger) -> dict:
    settings: KnownStageConfig = OmegaConf.to_object(cfg.stage)
    facts = load_configured_facts(cfg)  # before the model: a bad file fails in a second, not after a load
    started = time.time()
    loaded = load_configured_model(cfg)
    load_seconds = time.time() - started
    checked = time.time()
    rows, cached = knowledge_table(loaded, list(facts), cfg.paths.cache_dir, settings.batch_size)
    check_seconds = time.time() - checked
    per_fact = [{"case_id": f.case_id, "relation_id": f.relation_id, "subject": f.subject, "prompt": f.prompt,
                 "target_true": f.target_true, "continuation": r.continuation, "known": r.known} for f, r in zip(facts, rows)]
    atomic_write_jsonl(job_dir / "knowledge.jsonl", per_fact)
    by_relation: dict[str, list[int]] = {}
    for row in per_fact:
        by_relation.setdefault(str(row["relation_id"]), []).append(int(row["known"]))
    summary = {
        "model": loaded.identity["name"],
        "dataset": cfg.dataset.name,
        "n_facts": len(per_fact),
        "n_known": sum(r["known"] for r in per_fact),
        "fraction_known": sum(r["known"] for r in per_fact) / max(1, len(per_fact)),
        "known_by_relation": {rel: f"{sum(v)}/{len(v)}" for rel, v in sorted(by_relation.items())},
        "load_seconds": round(load_seconds, 2),
        "check_seconds": round(check_seconds, 2),
        "from_cache": cached,
        "load_report": facts.report.to_dict() if hasattr(facts, "report") else None,
    }
    if summary["load_report"]:
        summary["load_report"]["errors"] = summary["load_report"]["errors"][:20]
    logger.log_scalars({"known/n_facts": summary["n_facts"], "known/n_known": summary["n_known"],
                        "known/fraction": summary["fraction_known"]})
    logger.log_table("known/facts", per_fact)
    return with_load_summary(summary, facts)
