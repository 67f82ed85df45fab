"""The editing figure: does an edit made from one perspective show on the other side?

Per editor a 2x2 grid, edit perspective (rows) x evaluated side (columns), each panel the side's
rates before (grey) and after (colour) the edit with their confidence intervals. The relation
side adds the strict top-1 (the relation phrase is the model's greedy next token), the binary
metrics' blind spot: a rate can rise while the model's own answer does not change. Collapsed edits
(``metrics.quality``) are counted in each panel's title, so a wrecked model is never read as a
success.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

PERSPECTIVES = ("entity", "relation")
SIDE_METRICS = {"entity": ("reliability", "generality", "locality"),
                "relation": ("reliability", "generality", "locality", "top1")}
METRIC_LABELS = {"reliability": "Rel.", "generality": "Gen.", "locality": "Loc.", "top1": "top-1"}
POST_COLORS = {"entity": "tab:blue", "relation": "tab:orange"}


def _estimate(frame: pd.DataFrame, editor: str, perspective: str, side: str, metric: str, stage: str) -> tuple[float, float, float] | None:
    rows = frame[(frame["editor"] == editor) & (frame["perspective"] == perspective) & (frame["side"] == side)
                 & (frame["metric"] == metric) & (frame["stage"] == stage)]
    if rows.empty or pd.isna(rows.iloc[0]["mean"]):
        return None
    row = rows.iloc[0]
    return float(row["mean"]), float(row["low"]), float(row["high"])


def plot_editing(frame: pd.DataFrame, editors: Sequence[str] | None = None, confidence: float = 0.95) -> Figure:
    """Pre -> post bars with intervals for each editor x edit perspective x side (rates in %).

    ``frame``: tidy edit rows of one model (``pipeline.stages.summarize.collect``: editor,
    perspective, side, metric, stage, mean, low, high, n_cases, n_collapsed).
    """
    if frame["model"].nunique() > 1:
        raise ValueError(f"plot_editing draws one model, got {sorted(frame['model'].unique())}")
    editors = list(editors) if editors is not None else sorted(frame["editor"].unique())
    fig = Figure(figsize=(7.2, 4.6 * len(editors)), layout="constrained")
    panels = fig.subfigures(len(editors), 1, squeeze=False)[:, 0]
    width = 0.38
    for panel, editor in zip(panels, editors):
        axes = panel.subplots(2, 2, sharey=True)
        panel.suptitle(f"{editor} ({frame['model'].iloc[0]}): pre -> post, {int(confidence * 100)}% CI", fontsize=10)
        for i, perspective in enumerate(PERSPECTIVES):
            jobs = frame[(frame["editor"] == editor) & (frame["perspective"] == perspective)]
            for j, side in enumerate(PERSPECTIVES):
                ax = axes[i, j]
                metrics = SIDE_METRICS[side]
                x = np.arange(len(metrics))
                for offset, stage, color in ((-width / 2, "pre", "0.7"), (width / 2, "post", POST_COLORS[perspective])):
                    values = [_estimate(frame, editor, perspective, side, m, stage) for m in metrics]
                    means = np.array([100 * v[0] if v else np.nan for v in values])
                    errors = np.array([[100 * (v[0] - v[1]), 100 * (v[2] - v[0])] if v else [0.0, 0.0] for v in values]).T
                    ax.bar(x + offset, means, width, yerr=errors, color=color, capsize=2, label=stage,
                           error_kw={"linewidth": 0.8})
                ax.set_xticks(x, [METRIC_LABELS[m] for m in metrics], fontsize=8)
                ax.set_ylim(0, 105)
                title = f"{perspective} edit -> {side} side"
                if not jobs.empty and "n_collapsed" in jobs and jobs["n_collapsed"].notna().any():
                    title += f"\n{int(jobs['n_collapsed'].dropna().iloc[0])} of {int(jobs['n_cases'].iloc[0])} collapsed"
                elif jobs.empty:
                    title += "\n(not run)"
                ax.set_title(title, fontsize=8)
                if j == 0:
                    ax.set_ylabel("%")
        axes[0, 1].legend(fontsize=7, loc="upper right")
    return fig
