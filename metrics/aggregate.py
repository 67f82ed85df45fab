"""Aggregates over cases: means with seeded percentile-bootstrap CIs, harmonic scores, pre vs post.

Cases are resampled jointly: one ``[resample case]`` index matrix (from ``seed``) serves every
metric, the pre and the post rows, so a harmonic score's interval accounts for the correlation of
its components and a post - pre delta is a paired comparison.

A per-case value of ``None`` means "not measured" (e.g. no relation id, no neighbourhood
prompt) and NaN means "numerical failure"; both are left out of the mean and counted
(``n_missing``, ``n_nan``), never read as zero.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from core.bootstrap import bootstrap_indices
from core.errors import DataError
from metrics.fields import METRICS, SCORES

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Estimate:
    """A mean over cases and its bootstrap interval; NaN mean when no case has a value."""

    mean: float
    low: float
    high: float
    n: int
    n_missing: int = 0
    n_nan: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN becomes None (strict JSON has no NaN)."""
        return {key: None if isinstance(value, float) and math.isnan(value) else value
                for key, value in asdict(self).items()}


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative rates; 0 if any is 0, NaN if any is NaN or none are given."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0 or np.isnan(array).any():
        return math.nan
    if (array < 0).any():
        raise ValueError(f"harmonic mean of negative values is undefined: {array.tolist()}")
    if (array == 0).any():
        return 0.0
    return float(array.size / np.sum(1.0 / array))


def as_array(values: Iterable[Optional[float]]) -> tuple[np.ndarray, int, int]:
    """Per-case values -> (float64 array with NaN for None, n_missing, n_nan)."""
    values = list(values)
    missing = sum(v is None for v in values)
    array = np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    return array, missing, int(np.isnan(array).sum()) - missing


def resampled_means(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Mean of the non-NaN values of each resample (NaN if a resample has none).  [case] -> [resample]"""
    picked = values[indices]  # [resample case]
    valid = ~np.isnan(picked)
    counts = valid.sum(axis=1)
    sums = np.where(valid, picked, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), math.nan)


def interval(resamples: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of bootstrap statistics (NaN resamples ignored)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    finite = resamples[~np.isnan(resamples)]
    if finite.size == 0:
        return math.nan, math.nan
    alpha = 1.0 - confidence
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _point_mean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def mean_ci(values: Iterable[Optional[float]], n_resamples: int = 1000, confidence: float = 0.95,
            seed: int = 0) -> Estimate:
    """Mean of per-case values with a percentile-bootstrap interval (deterministic under ``seed``)."""
    array, missing, nans = as_array(values)
    low, high = interval(resampled_means(array, bootstrap_indices(len(array), n_resamples, seed)), confidence)
    return Estimate(_point_mean(array), low, high, int((~np.isnan(array)).sum()), missing, nans)


# -- pre / post tables --------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricRow:
    """One metric (or harmonic score) before and after editing; ``post``/``delta`` None without post rows."""

    metric: str
    pre: Estimate
    post: Optional[Estimate] = None
    delta: Optional[Estimate] = None

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "pre": self.pre.to_dict(),
                "post": self.post.to_dict() if self.post else None, "delta": self.delta.to_dict() if self.delta else None}


@dataclass
class EvaluationTable:
    """Aggregates of one evaluation: a row per metric and per score, plus how they were made."""

    rows: list[MetricRow]
    n_cases: int
    n_resamples: int
    confidence: float
    seed: int
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def has_post(self) -> bool:
        return any(row.post is not None for row in self.rows)

    def row(self, metric: str) -> MetricRow:
        for row in self.rows:
            if row.metric == metric:
                return row
        raise KeyError(metric)

    def to_dict(self) -> dict[str, Any]:
        return {"n_cases": self.n_cases, "n_resamples": self.n_resamples, "confidence": self.confidence,
                "seed": self.seed, "counts": dict(self.counts), "rows": [row.to_dict() for row in self.rows]}

    def scalars(self) -> dict[str, float]:
        """Flat ``{pre|post|delta}/<metric>[_low|_high]`` values for experiment loggers."""
        out: dict[str, float] = {}
        for row in self.rows:
            for stage, estimate in (("pre", row.pre), ("post", row.post), ("delta", row.delta)):
                if estimate is not None:
                    out[f"{stage}/{row.metric}"] = estimate.mean
                    out[f"{stage}/{row.metric}_low"] = estimate.low
                    out[f"{stage}/{row.metric}_high"] = estimate.high
        return out


def _case_ids(rows: Sequence[Row], key: str) -> list[Any]:
    ids = []
    for index, row in enumerate(rows):
        if "case_id" not in row:
            raise DataError(f"{key}[{index}]", sorted(row)[:5], "row has no case_id", "rows come from CaseScores.to_row()")
        ids.append(row["case_id"])
    seen: set[Any] = set()
    for case_id in ids:
        if case_id in seen:
            raise DataError(key, case_id, "duplicate case id", "evaluate each case once per side", case_id=case_id)
        seen.add(case_id)
    return ids


def _align(rows_pre: Sequence[Row], rows_post: Sequence[Row]) -> list[Row]:
    """Post rows in the order of the pre rows; both must hold the same case ids."""
    pre_ids, post_ids = _case_ids(rows_pre, "rows_pre"), _case_ids(rows_post, "rows_post")
    if set(pre_ids) != set(post_ids):
        only_pre = sorted(set(pre_ids) - set(post_ids), key=str)[:5]
        only_post = sorted(set(post_ids) - set(pre_ids), key=str)[:5]
        raise DataError("rows_post", f"only pre: {only_pre}, only post: {only_post}",
                        "pre and post rows cover different cases", "evaluate the same cases before and after editing")
    by_id = {row["case_id"]: row for row in rows_post}
    return [by_id[case_id] for case_id in pre_ids]


def _column(rows: Sequence[Row], metric: str) -> tuple[np.ndarray, int, int]:
    return as_array(row.get(metric) for row in rows)


def aggregate(rows_pre: Sequence[Row], rows_post: Optional[Sequence[Row]] = None, *,
              metrics: Sequence[str] = METRICS, scores: Mapping[str, Sequence[str]] = SCORES,
              n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> EvaluationTable:
    """Means, intervals and harmonic scores of per-case rows, pre (and post, paired by case id).

    Harmonic scores combine the component *means* (ROME's Score), so a score's interval comes
    from the same case resamples as its components. ``delta`` = post - pre of each resample.
    """
    _case_ids(rows_pre, "rows_pre")
    post = _align(rows_pre, rows_post) if rows_post is not None else None
    indices = bootstrap_indices(len(rows_pre), n_resamples, seed)
    needed = list(dict.fromkeys([*metrics, *(c for parts in scores.values() for c in parts)]))

    def side(rows: Sequence[Row]) -> tuple[dict[str, Estimate], dict[str, tuple[float, np.ndarray]]]:
        estimates, draws = {}, {}
        for metric in needed:
            values, missing, nans = _column(rows, metric)
            resamples = resampled_means(values, indices)
            point = _point_mean(values)
            estimates[metric] = Estimate(point, *interval(resamples, confidence),
                                         int((~np.isnan(values)).sum()), missing, nans)
            draws[metric] = (point, resamples)
        for name, parts in scores.items():
            point = harmonic_mean([draws[p][0] for p in parts])
            resamples = np.array([harmonic_mean(col) for col in np.stack([draws[p][1] for p in parts], axis=1)]) \
                if len(rows) else np.array([math.nan])
            n = min(estimates[p].n for p in parts)
            estimates[name], draws[name] = Estimate(point, *interval(resamples, confidence), n), (point, resamples)
        return estimates, draws

    pre_estimates, pre_draws = side(rows_pre)
    post_estimates, post_draws = side(post) if post is not None else ({}, {})
    table_rows = []
    for metric in [*metrics, *scores]:
        delta = None
        if post is not None:
            (pre_point, pre_res), (post_point, post_res) = pre_draws[metric], post_draws[metric]
            paired = min(pre_estimates[metric].n, post_estimates[metric].n)
            delta = Estimate(post_point - pre_point, *interval(post_res - pre_res, confidence), paired)
        table_rows.append(MetricRow(metric, pre_estimates[metric], post_estimates.get(metric), delta))
    counts = {"relation_side": sum(row.get("relation.reliability") is not None for row in rows_pre)}
    counts["without_relation"] = len(rows_pre) - counts["relation_side"]
    return EvaluationTable(table_rows, len(rows_pre), n_resamples, confidence, seed, counts)
