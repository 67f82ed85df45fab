"""Choosing an editor's knobs from a grid of scored points: eligibility, ranking, rank correlation.

Pure functions over the per-point means that ``stage=calibrate`` aggregates (no model, no I/O).
A point is *eligible* when editing did not damage the model's writing: its mean fluency fell by
at most ``max_fluency_drop`` of the unedited model's, and at most ``max_collapse_rate`` of its
edits collapsed (``metrics.quality.is_collapsed``). A binary success rate can be passed by a
wrecked model, so the best score among all points is not the answer; the best among the
eligible ones is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Eligibility:
    """The fluency floor: how much mean fluency may fall, and how many edits may collapse."""

    max_fluency_drop: float
    max_collapse_rate: float


def fluency_drop(pre: Optional[float], post: Optional[float]) -> float:
    """Relative fall of mean fluency, ``(pre - post) / pre`` (negative: it rose); NaN if unmeasured.

    Fluency is an entropy (>= 0): a model that scores 0 before the edit has nothing to lose (0).
    """
    if pre is None or post is None or not math.isfinite(pre) or math.isnan(post):
        return math.nan
    if not math.isfinite(post):
        return math.inf
    return (pre - post) / pre if pre > 0 else 0.0


def ineligible_reason(drop: float, collapse_rate: float, rule: Eligibility) -> Optional[str]:
    """Why a point may not win (None: it may). An unmeasured fluency never passes the floor."""
    if math.isnan(drop):
        return "fluency not measured"
    if drop > rule.max_fluency_drop:
        return f"fluency fell {drop:.1%} (> {rule.max_fluency_drop:.0%})"
    if collapse_rate > rule.max_collapse_rate:
        return f"{collapse_rate:.0%} of edits collapsed (> {rule.max_collapse_rate:.0%})"
    return None


def ranking(scores: Sequence[float], eligible: Sequence[bool]) -> list[int]:
    """Indices of the eligible points, best score first; ties keep grid order; NaN scores last."""
    keyed = [(math.isnan(score), -score if not math.isnan(score) else 0.0, index)
             for index, (score, ok) in enumerate(zip(scores, eligible)) if ok]
    return [index for *_, index in sorted(keyed)]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for fewer than 3 pairs or a constant side."""
    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return math.nan
    ranks = [_ranks(np.array(side, dtype=np.float64)) for side in zip(*pairs)]
    if any(r.std() == 0 for r in ranks):
        return math.nan
    return float(np.corrcoef(ranks[0], ranks[1])[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):  # ties share their mean rank
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def peak(by_layer: Mapping[int, float]) -> Optional[int]:
    """The layer of the largest finite value (None if there is none)."""
    finite = {layer: value for layer, value in by_layer.items() if math.isfinite(value)}
    return max(finite, key=finite.__getitem__) if finite else None
