"""Rank of a target among candidates (the strict relation-side metric: r among all 34 phrases).

Ranks are 1-based and pessimistic on ties: a candidate with the *same* NLL as the target counts
as ahead of it, so a model that scores every candidate alike ranks the target last, not first.
A row with any NaN NLL has a NaN rank (its order is unknown).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def target_rank(nll: Tensor, target: Tensor) -> Tensor:
    """1-based rank of candidate ``target[i]`` by ascending NLL in row i.

    nll: [prompt candidate], target: [prompt] (long) -> [prompt] float64
    """
    if nll.dim() != 2 or nll.shape[1] == 0:
        raise ValueError(f"expected NLLs of shape [prompt candidate] with >= 1 candidate, got {tuple(nll.shape)}")
    if target.shape != (nll.shape[0],):
        raise ValueError(f"expected one target index per prompt ({nll.shape[0]}), got shape {tuple(target.shape)}")
    if nll.shape[0] and (target.min() < 0 or target.max() >= nll.shape[1]):
        raise ValueError(f"target index out of range 0..{nll.shape[1] - 1}")
    own = nll.gather(1, target[:, None].long())  # [prompt 1]
    others = torch.ones_like(nll, dtype=torch.bool).scatter_(1, target[:, None].long(), False)
    ahead = ((nll <= own) & others).sum(dim=1).to(torch.float64)  # [prompt]
    rank = ahead + 1
    return torch.where(nll.isnan().any(dim=1), torch.full_like(rank, math.nan), rank)


def top1(rank: Tensor) -> Tensor:
    """1.0 where the target ranks first, else 0.0; NaN stays NaN.  [prompt] -> [prompt]"""
    return torch.where(rank.isnan(), rank, (rank == 1).to(rank.dtype))


def reciprocal_rank(rank: Tensor) -> Tensor:
    """1 / rank (its mean over cases is the MRR); NaN stays NaN.  [prompt] -> [prompt]"""
    return 1.0 / rank


def mean_or_none(values: Tensor) -> float | None:
    """Mean of a per-prompt tensor; None when there are no prompts (NaN propagates)."""
    return None if values.numel() == 0 else values.to(torch.float64).mean().item()
