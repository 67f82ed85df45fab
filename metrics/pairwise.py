"""Pairwise comparisons of two targets on the same prompts (ROME/MEMIT's success and magnitude).

Inputs are mean per-token NLLs (``models.scoring``), one per prompt. A prompt is a success when
the preferred target has strictly lower NLL: a tie is not a success, in either direction, since a
model that cannot tell two targets apart has learnt neither (ROME uses strict comparisons too).
A NaN NLL makes that prompt's outcome NaN, and a case with any NaN prompt is NaN: numerical
trouble is reported, never counted as a failure or a success.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


def prefers(nll_preferred: Tensor, nll_other: Tensor) -> Tensor:
    """1.0 where the preferred target has strictly lower NLL, 0.0 where not, NaN where either is NaN.

    nll_preferred, nll_other: [prompt] -> [prompt] float
    """
    _check_same_shape(nll_preferred, nll_other)
    wins = (nll_preferred < nll_other).to(torch.float64)
    return torch.where(nll_preferred.isnan() | nll_other.isnan(), torch.full_like(wins, math.nan), wins)


def probability_margin(nll_preferred: Tensor, nll_other: Tensor) -> Tensor:
    """``exp(-nll_preferred) - exp(-nll_other)``: the gap in (per-token geometric mean) probability.

    Positive when the preferred target is more likely; ROME's "magnitude". [prompt] -> [prompt]
    """
    _check_same_shape(nll_preferred, nll_other)
    return torch.exp(-nll_preferred.to(torch.float64)) - torch.exp(-nll_other.to(torch.float64))


@dataclass(frozen=True)
class Comparison:
    """One case's outcome over its prompts: success rate and mean margin (None without prompts)."""

    success: Optional[float]
    margin: Optional[float]
    n_prompts: int


def compare(nll_preferred: Tensor, nll_other: Tensor) -> Comparison:
    """Mean success and mean margin over one case's prompts.  [prompt], [prompt] -> Comparison

    An empty prompt set gives ``Comparison(None, None, 0)`` (nothing to measure, not a zero).
    """
    _check_same_shape(nll_preferred, nll_other)
    if nll_preferred.numel() == 0:
        return Comparison(None, None, 0)
    success = prefers(nll_preferred, nll_other).mean().item()
    margin = probability_margin(nll_preferred, nll_other).mean().item()
    return Comparison(success, margin, int(nll_preferred.numel()))


def _check_same_shape(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"expected two 1-d NLL tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
