"""Paired, per-fact statistics: a seeded bootstrap over facts for any function of column means.

Every statistic the tracing study decides on is a function of means over the same facts: a mean
per-fact difference (``mean(d)``), a ratio of means (the share of the hidden-state effect that
severing removes, ``mean(removed) / mean(hidden)``), or a difference of such ratios between two
perspectives. Resampling whole facts (rows) keeps every column of a fact together, so the interval
accounts for the pairing; marginal intervals that merely overlap say nothing about a difference.

The minimum detectable effect (MDE) is the true effect this design would detect with 80% power in
a two-sided test at alpha = 0.05: ``MDE = (z_{0.975} + z_{0.80}) x SE = (1.960 + 0.842) x SE ~= 2.80 x SE``,
where SE is the bootstrap standard error of the statistic (the standard deviation of its
resampled values; for a mean difference this is ``sd(d) / sqrt(n)`` up to resampling noise).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from core.bootstrap import bootstrap_indices
from core.errors import DataError
from metrics.aggregate import interval

Z_ALPHA = 1.959964  # two-sided alpha = 0.05
Z_POWER = 0.841621  # power 0.80
MDE_FACTOR = Z_ALPHA + Z_POWER  # ~2.80

# statistic(means): column means [..., column] -> the statistic [...]
Statistic = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PairedEstimate:
    """A statistic over ``n`` paired facts: point value, percentile interval and bootstrap standard error."""

    value: float
    low: float
    high: float
    se: float
    n: int
    confidence: float

    @property
    def mde(self) -> float:
        """Minimum detectable effect (80% power, two-sided alpha 0.05): ``MDE_FACTOR x se``."""
        return MDE_FACTOR * self.se

    def covers_zero(self) -> bool:
        return not (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict[str, Any]:
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in {**asdict(self), "mde": self.mde}.items()}


def complete_rows(columns: np.ndarray) -> np.ndarray:
    """Facts with a finite value in every column.  [fact column] -> [fact' column]"""
    columns = np.asarray(columns, dtype=np.float64)
    if columns.ndim != 2:
        raise DataError("columns", list(columns.shape), "paired columns must be [fact column]")
    return columns[np.isfinite(columns).all(axis=1)]


def paired_bootstrap(columns: np.ndarray, statistic: Statistic, n_resamples: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> PairedEstimate:
    """``statistic`` of the column means over facts, with a paired percentile-bootstrap interval.

    columns: [fact column]; facts with a NaN anywhere are left out (``n`` counts the rest). Every
    resample draws whole facts (``core.bootstrap.bootstrap_indices``, the same draws for every
    column), so the interval is that of the paired statistic. NaN everywhere when no fact is left.
    """
    rows = complete_rows(columns)
    n = rows.shape[0]
    if n == 0:
        return PairedEstimate(math.nan, math.nan, math.nan, math.nan, 0, confidence)
    value = float(statistic(rows.mean(axis=0)))
    indices = bootstrap_indices(n, n_resamples, seed)  # [resample fact]
    with np.errstate(invalid="ignore", divide="ignore"):
        resampled = np.asarray(statistic(rows[indices].mean(axis=1)), dtype=np.float64)  # [resample]
    low, high = interval(resampled, confidence)
    finite = resampled[np.isfinite(resampled)]
    se = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
    return PairedEstimate(value, low, high, se, n, confidence)


def mean_difference(values: np.ndarray, **kwargs) -> PairedEstimate:
    """Mean of per-fact differences ``values`` [fact] (already paired: e.g. upper - middle of one fact)."""
    return paired_bootstrap(np.asarray(values, dtype=np.float64)[:, None], lambda m: m[..., 0], **kwargs)


def ratio_of_means(numerator: np.ndarray, denominator: np.ndarray, **kwargs) -> PairedEstimate:
    """``mean(numerator) / mean(denominator)`` over the same facts, resampled together."""
    columns = np.stack([np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)], axis=1)
    return paired_bootstrap(columns, lambda m: m[..., 0] / m[..., 1], **kwargs)
