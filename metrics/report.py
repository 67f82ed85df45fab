"""Markdown rendering of an EvaluationTable: pre-edit baselines next to post-edit values."""

from __future__ import annotations

import math
from typing import Optional

from metrics.aggregate import Estimate, EvaluationTable
from metrics.fields import DESCRIPTIONS, EDIT_SCORES


def format_estimate(estimate: Optional[Estimate], digits: int = 3, signed: bool = False,
                    significant: bool = False) -> str:
    """``0.245 [0.185, 0.305]``; an em dash when there is nothing to show.

    ``significant``: ``digits`` significant digits instead of decimals (probability margins of
    multi-token phrases are often ~1e-4, which fixed decimals would print as 0.000).
    """
    if estimate is None or math.isnan(estimate.mean):
        return "—"
    spec = ("+" if signed else "") + (f".{digits}g" if significant else f".{digits}f")
    text = f"{estimate.mean:{spec}}"
    if not (math.isnan(estimate.low) or math.isnan(estimate.high)):
        text += f" [{estimate.low:{spec}}, {estimate.high:{spec}}]"
    return text


def render_markdown(table: EvaluationTable, title: Optional[str] = None, digits: int = 3) -> str:
    """One table per side (entity, relation), a row per metric then the harmonic scores.

    Rates and scores print with ``digits`` decimals, margins with ``digits`` significant digits.

    Columns: pre-edit (always), post-edit and post - pre (when post rows were given), and n
    (cases with a value). A footer says how intervals were made and what was left out.
    """
    lines: list[str] = [f"## {title}", ""] if title else []
    header = ["metric", "pre-edit"] + (["post-edit", "Δ post − pre"] if table.has_post else []) + ["n", "meaning"]
    sides = list(dict.fromkeys(row.metric.split(".", 1)[0] for row in table.rows))
    for side in sides:
        rows = [row for row in table.rows if row.metric.split(".", 1)[0] == side]
        lines += [f"### {side} side", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in sorted(rows, key=lambda r: r.metric in EDIT_SCORES):
            name = row.metric.split(".", 1)[1]
            margin = row.metric.endswith("_margin")
            cells = [f"**{name}**" if row.metric in EDIT_SCORES else name, format_estimate(row.pre, digits, significant=margin)]
            if table.has_post:
                cells += [format_estimate(row.post, digits, significant=margin),
                          format_estimate(row.delta, digits, signed=True, significant=margin)]
            n = row.pre.n if row.post is None else min(row.pre.n, row.post.n)
            cells += [str(n), DESCRIPTIONS.get(row.metric, "")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    percent = round(table.confidence * 100, 1)
    lines.append(f"{table.n_cases} cases; means over cases with {percent:g}% percentile-bootstrap intervals "
                 f"({table.n_resamples} case resamples, seed {table.seed}); scores are harmonic means of the "
                 "component means.")
    if table.counts.get("without_relation"):
        lines.append(f"Relation side: {table.counts['relation_side']} cases with a relation id; "
                     f"{table.counts['without_relation']} without one are left out (not guessed).")
    nans = {row.metric: row.pre.n_nan + (row.post.n_nan if row.post else 0) for row in table.rows}
    if any(nans.values()):
        listed = ", ".join(f"{metric} ({count})" for metric, count in nans.items() if count)
        lines.append(f"Numerical failures (NaN NLLs) left out: {listed}.")
    return "\n".join(lines) + "\n"
