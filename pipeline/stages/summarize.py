"""Stage ``summarize``: collect a sweep's job dirs into tidy tables and one W&B summary run.

Reads every finished job (``results.json``) under ``stage.sweep_dir``: edit results of ``stage=edit``
jobs and of the default ``stage=full`` jobs (their ``edit/`` step), and AIE tables of ``stage=trace``
jobs and of ``full`` jobs (their ``trace/`` step). Writes into the job dir:

- ``summary.{csv,parquet}``: one row per job x side x metric x pre/post, with the interval;
- ``aie.{csv,parquet}``: one row per job x score name x token role x layer, with the interval;
- ``summary.md``: pre -> post per editor x edit perspective x side x metric, next to the paper's
  GPT-2 XL numbers (``metrics.paper``).

The job's W&B run (job_type ``summarize``, group = the sweep) carries both tables and one scalar per
editor/perspective/side/metric, so a dashboard compares a whole sweep at a glance.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from core.errors import ConfigError
from core.io import atomic_path, atomic_write_text, read_json, read_jsonl
from pipeline.jobs import finished_steps
from pipeline.stages.config import SummarizeStageConfig
from metrics.paper import PAPER_EDITING

log = logging.getLogger(__name__)


# Metrics in their own units (bits, nats/token), printed as they are; every other metric is a rate (%).
UNIT_METRICS = ("quality.fluency", "quality.nll")


def collect(sweep_dir: str | Path) -> pd.DataFrame:
    """Tidy edit rows: job, model, editor, perspective, side, metric, stage (pre/post), mean, low, high, n, n_collapsed.

    ``n_collapsed`` (edits flagged by ``metrics.quality.is_collapsed``) is None for jobs run without
    ``stage.quality`` (or before it existed).
    """
    rows: list[dict[str, Any]] = []
    for job_dir, directory, summary in finished_steps(sweep_dir, "edit"):
        if not (directory / "aggregates.json").exists():
            continue
        for row in read_json(directory / "aggregates.json")["rows"]:
            for stage in ("pre", "post"):
                estimate = row.get(stage)
                if not estimate:
                    continue
                rows.append({"job": job_dir.name, "model": summary["model"], "editor": summary["editor"],
                             "perspective": summary["perspective"], "n_cases": summary["n_cases"],
                             "side": row["metric"].split(".")[0], "metric": row["metric"].split(".", 1)[1], "stage": stage,
                             "mean": estimate["mean"], "low": estimate["low"], "high": estimate["high"], "n": estimate["n"],
                             "n_collapsed": summary.get("n_collapsed")})
    return pd.DataFrame(rows)


def collect_aie(sweep_dir: str | Path) -> pd.DataFrame:
    """Tidy AIE rows of every trace: job, model, perspective, name, role, layer, aie, low, high, tokens, n_facts."""
    frames = []
    for job_dir, directory, summary in finished_steps(sweep_dir, "trace"):
        if not (directory / "aie.jsonl").exists():
            continue
        frame = pd.DataFrame(read_jsonl(directory / "aie.jsonl"))
        frame.insert(0, "job", job_dir.name)
        frame.insert(1, "model", summary["model"])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def markdown(frame: pd.DataFrame, metrics: list[str]) -> str:
    """editor x perspective x side x metric, pre -> post (in %; fluency and NLL in bits and nats/token),
    with the paper's GPT-2 XL values, then the collapsed edits per job."""
    wanted = frame[(frame["side"] + "." + frame["metric"]).isin(metrics)]
    wide = wanted.pivot_table(index=["model", "editor", "perspective", "side", "metric"], columns="stage",
                              values="mean", aggfunc="first").reset_index()
    bounds = wanted[wanted["stage"] == "post"].set_index(["model", "editor", "perspective", "side", "metric"])
    lines = ["| model | editor | edit perspective | side | metric | pre | post [95% CI] | paper GPT-2 XL |",
             "|---|---|---|---|---|---|---|---|"]
    for record in wide.sort_values(["model", "editor", "perspective", "side", "metric"]).to_dict("records"):
        key = (record["model"], record["editor"], record["perspective"], record["side"], record["metric"])
        paper = PAPER_EDITING.get(record["metric"], {}).get((record["editor"], record["perspective"], record["side"]))
        show = _plain if f"{record['side']}.{record['metric']}" in UNIT_METRICS else _percent
        post = show(record.get("post"))
        if post and key in bounds.index:
            bound = bounds.loc[[key]].iloc[0]
            post += f" [{show(bound['low'], 0 if show is _percent else 2)}, {show(bound['high'], 0 if show is _percent else 2)}]"
        cells = [show(record.get("pre")), post, f"{paper:.2f}" if paper is not None else ""]
        lines.append(f"| {record['model']} | {record['editor']} | {record['perspective']} | {record['side']} | {record['metric']} | "
                     + " | ".join(cells) + " |")
    if "n_collapsed" in frame and frame["n_collapsed"].notna().any():
        jobs = frame.drop_duplicates("job").dropna(subset=["n_collapsed"])
        lines += ["", "Collapsed edits (NLL or fluency past stage.quality.collapse; the `*_guarded` rates count them "
                  "as failures): " + "; ".join(f"{r['editor']} {r['perspective']} ({r['model']}): {int(r['n_collapsed'])} "
                                               f"of {r['n_cases']}" for r in jobs.to_dict("records")) + "."]
    return "\n".join(lines) + "\n"


def _plain(value: Any, digits: int = 3) -> str:
    return "" if value is None or pd.isna(value) else f"{float(value):.{digits}f}"


def _percent(value: Any, digits: int = 1) -> str:
    return "" if value is None or pd.isna(value) else f"{100 * float(value):.{digits}f}"


def write_tables(frame: pd.DataFrame, directory: Path, stem: str) -> list[str]:
    """``<stem>.csv`` and ``<stem>.parquet`` (atomic): the same tidy rows for spreadsheets and pandas."""
    atomic_write_text(directory / f"{stem}.csv", frame.to_csv(index=False))
    with atomic_path(directory / f"{stem}.parquet") as tmp:
        frame.to_parquet(tmp, index=False)
    return [f"{stem}.csv", f"{stem}.parquet"]


def run(cfg: DictConfig, job_dir: Path, logger) -> dict:
    settings: SummarizeStageConfig = OmegaConf.to_object(cfg.stage)
    sweep_dir = Path(settings.sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError("stage.sweep_dir", str(sweep_dir), "not a directory", "pass the sweep dir of a sweep")
    edits, aie = collect(sweep_dir), collect_aie(sweep_dir)
    if edits.empty and aie.empty:
        raise ConfigError("stage.sweep_dir", str(sweep_dir), "holds no finished edit, trace or full jobs", "run the sweep first")
    files: list[str] = []
    if not edits.empty:
        files += write_tables(edits, job_dir, "summary")
        table = markdown(edits, list(settings.metrics))
        atomic_write_text(job_dir / "summary.md", table)
        files.append("summary.md")
        logger.log_table("summary/edits", edits.to_dict("records"))
        post = edits[edits["stage"] == "post"]
        logger.log_scalars({f"summary/{r['editor']}/{r['perspective']}/{r['side']}.{r['metric']}": r["mean"]
                            for r in post.to_dict("records") if r["mean"] is not None and not math.isnan(r["mean"])})
        log.info("summarized %d edit jobs of %s\n%s", edits["job"].nunique(), sweep_dir, table)
    if not aie.empty:
        files += write_tables(aie, job_dir, "aie")
        logger.log_table("summary/aie", aie.to_dict("records"))
    return {"sweep_dir": str(sweep_dir), "edit_jobs": sorted(set(edits["job"])) if not edits.empty else [],
            "trace_jobs": sorted(set(aie["job"])) if not aie.empty else [], "n_rows": len(edits), "n_aie_rows": len(aie),
            "files": files}
