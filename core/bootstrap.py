"""Seeded bootstrap resampling, shared by the metrics and the tracing aggregates."""

from __future__ import annotations

import numpy as np


def bootstrap_indices(n_cases: int, n_resamples: int, seed: int) -> np.ndarray:
    """Case indices drawn with replacement.  -> [resample case] int64"""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    return np.random.default_rng(seed).integers(0, n_cases, size=(n_resamples, n_cases)) if n_cases else \
        np.zeros((n_resamples, 0), dtype=np.int64)
