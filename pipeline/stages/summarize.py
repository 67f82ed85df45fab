"""Stage ``summarize``: collect the edit jobs of a sweep dir into one tidy table.

Reads every ``<sweep_dir>/**/results.json`` whose stage is ``edit`` (with its ``aggregates.json``)
and writes ``summary.csv`` (one row per editor x perspective x side x metric x pre/post, with the
interval) and ``summary.md`` (pre -> post per metric, and the paper's GPT-2 XL reliabilities for
reference) into the job dir.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import MISSING, DictConfig, OmegaConf

from core.errors import ConfigError
from core.io import atomic_write_text, read_json

log = logging.getLogger(__name__)

# Wei et al. (2024), GPT-2 XL reliability (%) by (editor, perspective of the edit, side scored).
PAPER_RELIABILITY: dict[tuple[str, str, str], float] = {
    ("rome", "entity", "entity"): 99.93, ("rome", "entity", "relation"): 96.12,
    ("memit", "entity", "entity"): 93.88, ("memit", "entity", "relation"): 97.28,
    ("rome", "relation", "entity"): 27.92, ("rome", "relation", "relation"): 99.99,
    ("memit", "relation", "entity"): 24.15, ("memit", "relation", "relation"): 91.36,
}


@dataclass
class SummarizeStageConfig:
    name: str = "summarize"
    sweep_dir: str = MISSING
    # Metrics for the markdown table (all metrics go to the csv).
    metrics: list[str] = field(default_factory=lambda: [
        "entity.reliability", "entity.generality", "entity.locality", "entity.score",
        "relation.reliability", "relation.generality", "relation.locality", "relation.removal", "relation.score"])


def collect(sweep_dir: str | Path) -> pd.DataFrame:
    """Tidy rows: job, model, editor, perspective, side, metric, stage (pre/post), mean, low, high, n."""
    rows: list[dict[str, Any]] = []
    for results_file in sorted(Path(sweep_dir).rglob("results.json")):
        payload = read_json(results_file)
        if payload.get("stage") != "edit" or not (results_file.parent / "aggregates.json").exists():
            continue
        summary = payload["results"]
        table = read_json(results_file.parent / "aggregates.json")
        for row in table["rows"]:
            for stage in ("pre", "post"):
                estimate = row.get(stage)
                if not estimate:
                    continue
                rows.append({"job": results_file.parent.name, "model": summary["model"], "editor": summary["editor"],
                             "perspective": summary["perspective"], "n_cases": summary["n_cases"],
                             "side": row["metric"].split(".")[0], "metric": row["metric"].split(".", 1)[1], "stage": stage,
                             "mean": estimate["mean"], "low": estimate["low"], "high": estimate["high"], "n": estimate["n"]})
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame, metrics: list[str]) -> str:
    """editor x perspective x side x metric, pre -> post (in %), with the paper's reliability."""
    wanted = frame[(frame["side"] + "." + frame["metric"]).isin(metrics)]
    wide = wanted.pivot_table(index=["model", "editor", "perspective", "side", "metric"], columns="stage",
                              values="mean", aggfunc="first").reset_index()
    lines = ["| model | editor | edit perspective | side | metric | pre | post | paper GPT-2 XL |", "|---|---|---|---|---|---|---|---|"]
    for record in wide.sort_values(["model", "editor", "perspective", "side", "metric"]).to_dict("records"):
        paper = PAPER_RELIABILITY.get((record["editor"], record["perspective"], record["side"])) if record["metric"] == "reliability" else None
        cells = [_percent(record.get("pre")), _percent(record.get("post")), f"{paper:.2f}" if paper is not None else ""]
        lines.append(f"| {record['model']} | {record['editor']} | {record['perspective']} | {record['side']} | {record['metric']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _percent(value: Any) -> str:
    return "" if value is None or pd.isna(value) else f"{100 * float(value):.2f}"


def run(cfg: DictConfig, job_dir: Path, logger) -> dict:
    settings: SummarizeStageConfig = OmegaConf.to_object(cfg.stage)
    sweep_dir = Path(settings.sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError("stage.sweep_dir", str(sweep_dir), "not a directory", "pass the sweep dir of an edit sweep")
    frame = collect(sweep_dir)
    if frame.empty:
        raise ConfigError("stage.sweep_dir", str(sweep_dir), "holds no finished edit jobs", "run the edit sweep first")
    atomic_write_text(job_dir / "summary.csv", frame.to_csv(index=False))
    table = markdown(frame, list(settings.metrics))
    atomic_write_text(job_dir / "summary.md", table)
    logger.log_table("summary", frame.to_dict("records"))
    jobs = sorted(set(frame["job"]))
    log.info("summarized %d edit jobs of %s\n%s", len(jobs), sweep_dir, table)
    return {"sweep_dir": str(sweep_dir), "jobs": jobs, "n_rows": len(frame), "files": ["summary.csv", "summary.md"]}
