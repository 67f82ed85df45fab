"""Average indirect effect (AIE) by token role and layer, with bootstrap confidence intervals.

As in ROME's figure code, a role's AIE is the mean over every token of that role in every fact
(tokens of the middle / further roles each count once), so a fact with a long subject weighs
more in the middle role. Confidence intervals resample facts (not tokens) with replacement.
Pure functions over ``TraceResult`` tables: no model, no I/O.

The knockout aggregate (``aggregate_knockout``) reuses the same container and bootstrap: its
"roles" are the source sets, its values the mean relative drop in p(answer) over the facts that
have tokens in the set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from einops import einsum
from torch import Tensor

from core.bootstrap import bootstrap_indices
from core.errors import DataError
from tracing.result import TraceResult
from tracing.settings import KNOCKOUT_SOURCES, knockout_key
from tracing.spans import ROLES

KNOCKOUT = "knockout"  # the knockout aggregate's name (its roles are KNOCKOUT_SOURCES)
KNOCKOUT_NAMES = tuple(knockout_key(source) for source in KNOCKOUT_SOURCES)


def roles_of(name: str) -> tuple[str, ...]:
    """The rows of an aggregate: token roles, or the source sets for the knockout."""
    return KNOCKOUT_SOURCES if name == KNOCKOUT else ROLES


@dataclass
class RoleAIE:
    """AIE of one score name: ``mean``, ``low``, ``high`` are ``[role layer]`` (NaN where a role is empty).

    For the knockout (name ``knockout``) the roles are the source sets, the values relative drops
    in p(answer), and ``tokens`` counts the facts with tokens in each set.
    """

    name: str
    perspective: str
    mean: Tensor
    low: Tensor
    high: Tensor
    tokens: Tensor  # [role]: how many (fact, token) pairs each role averages over
    n_facts: int
    p_clean: float  # mean over facts
    p_corrupted: float
    confidence: float
    roles: tuple[str, ...] = ROLES

    def rows(self) -> list[dict[str, Any]]:
        """Long format for tables (W&B, CSV): one row per (role, layer)."""
        out = []
        for r, role in enumerate(self.roles):
            for layer in range(self.mean.shape[1]):
                out.append({"name": self.name, "perspective": self.perspective, "role": role, "layer": layer,
                            "aie": float(self.mean[r, layer]), "low": float(self.low[r, layer]),
                            "high": float(self.high[r, layer]), "tokens": int(self.tokens[r]), "n_facts": self.n_facts})
        return out

    def tensors(self) -> dict[str, Tensor]:
        return {f"{self.name}.{key}": value for key, value in
                (("mean", self.mean), ("low", self.low), ("high", self.high), ("tokens", self.tokens.float()))}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], name: str, perspective: str, n_facts: int, p_clean: float,
                     p_corrupted: float, confidence: float) -> "RoleAIE":
        """The inverse of ``tensors`` (e.g. a trace job's ``aie.safetensors``), given what it does not store."""
        return cls(name=name, perspective=perspective, mean=tensors[f"{name}.mean"], low=tensors[f"{name}.low"],
                   high=tensors[f"{name}.high"], tokens=tensors[f"{name}.tokens"].long(), n_facts=n_facts,
                   p_clean=p_clean, p_corrupted=p_corrupted, confidence=confidence, roles=roles_of(name))


def role_sums(result: TraceResult, name: str) -> tuple[Tensor, Tensor]:
    """Per-role sums of AIE over the role's tokens ``[role layer]`` and the token counts ``[role]``."""
    aie = result.aie(name).double()  # [pos layer]
    roles = result.roles()
    sums = torch.zeros(len(ROLES), aie.shape[1], dtype=torch.float64)
    counts = torch.zeros(len(ROLES), dtype=torch.float64)
    for r, role in enumerate(ROLES):
        positions = roles[role]
        if positions:
            sums[r] = aie[positions].sum(dim=0)
            counts[r] = len(positions)
    return sums, counts


def bootstrap_ratio(sums: Tensor, counts: Tensor, n_bootstrap: int = 1000, confidence: float = 0.95,
                    seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Ratio of sums ``sums.sum(0) / counts.sum(0)`` and its percentile bootstrap interval over facts.

    ``sums``: [fact role layer], ``counts``: [fact role]. Returns (mean, low, high), each [role layer];
    NaN where a role has no tokens. With one fact the interval collapses onto the mean.
    """
    n_facts = sums.shape[0]
    if n_facts == 0:
        raise DataError("facts", 0, "no traces to aggregate", hint="trace at least one known fact")
    total = counts.sum(0)[:, None]  # [role 1]
    mean = torch.where(total > 0, sums.sum(0) / total.clamp(min=1), torch.nan)
    draws = torch.from_numpy(bootstrap_indices(n_facts, n_bootstrap, seed))  # [boot fact]
    weights = torch.zeros(n_bootstrap, n_facts, dtype=sums.dtype).scatter_add_(
        1, draws, torch.ones(n_bootstrap, n_facts, dtype=sums.dtype))  # [boot fact]: times each fact was drawn
    boot_sums = einsum(weights, sums, "boot fact, fact role layer -> boot role layer")
    boot_counts = einsum(weights, counts, "boot fact, fact role -> boot role")[..., None]
    ratios = torch.where(boot_counts > 0, boot_sums / boot_counts.clamp(min=1), torch.nan)
    alpha = (1 - confidence) / 2
    low = torch.nanquantile(ratios, alpha, dim=0)
    high = torch.nanquantile(ratios, 1 - alpha, dim=0)
    return mean, low, high


def _one_perspective(results: Sequence[TraceResult]) -> str:
    perspectives = {r.perspective for r in results}
    if len(perspectives) > 1:
        raise DataError("perspective", sorted(perspectives), "traces of both perspectives mixed", hint="aggregate each perspective apart")
    return perspectives.pop()


def aggregate_knockout(results: Sequence[TraceResult], n_bootstrap: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> RoleAIE:
    """Mean relative drop in p(answer) per (source set, layer window) over ``results``, bootstrap over facts.

    A fact without tokens in a set (NaN row) is left out of that set's mean and resamples.
    """
    results = [r for r in results if r.settings.knockout_names]
    if not results:
        raise DataError("trace.kinds", KNOCKOUT, "no trace has a knockout", hint="include knockout in the trace's kinds")
    perspective = _one_perspective(results)
    drops = torch.stack([r.knockout().double() for r in results])  # [fact source layer]
    present = ~drops.isnan().all(dim=2)  # [fact source]
    mean, low, high = bootstrap_ratio(drops.nan_to_num(0.0), present.double(), n_bootstrap, confidence, seed)
    return RoleAIE(name=KNOCKOUT, perspective=perspective, mean=mean.float(), low=low.float(), high=high.float(),
                   tokens=present.sum(0).long(), n_facts=len(results),
                   p_clean=float(sum(r.p_clean for r in results) / len(results)),
                   p_corrupted=float(sum(r.p_corrupted for r in results) / len(results)), confidence=confidence,
                   roles=KNOCKOUT_SOURCES)


def aggregate_aie(results: Sequence[TraceResult], name: str = "hidden", n_bootstrap: int = 1000,
                  confidence: float = 0.95, seed: int = 0) -> RoleAIE:
    """AIE per (role, layer) over ``results`` (the facts the model knows) for one score name."""
    if name.startswith(f"{KNOCKOUT}_"):
        raise DataError("name", name, "knockout rows have no token roles", hint="use aggregate_knockout")
    results = [r for r in results if name in r.scores]
    if not results:
        raise DataError("trace.kinds", name, "no trace has this score", hint="include it in the trace's kinds / severed")
    perspective = _one_perspective(results)
    pairs = [role_sums(r, name) for r in results]
    sums = torch.stack([s for s, _ in pairs])
    counts = torch.stack([c for _, c in pairs])
    mean, low, high = bootstrap_ratio(sums, counts, n_bootstrap, confidence, seed)
    return RoleAIE(name=name, perspective=perspective, mean=mean.float(), low=low.float(), high=high.float(),
                   tokens=counts.sum(0).long(), n_facts=len(results),
                   p_clean=float(sum(r.p_clean for r in results) / len(results)),
                   p_corrupted=float(sum(r.p_corrupted for r in results) / len(results)), confidence=confidence)


def fact_aie(results: Sequence[TraceResult], name: str, role: str = "last_corrupted") -> Tensor:
    """Each fact's AIE curve at ``role`` (mean over the role's tokens; NaN where the fact has none or
    lacks ``name``).  -> [fact layer]

    Kept per fact so that two perspectives' traces of the same facts can be paired
    (``pipeline.paired``); ``aggregate_aie`` only keeps the mean over facts.
    """
    if role not in ROLES:
        raise DataError("role", role, "unknown token role", hint=f"use one of {', '.join(ROLES)}")
    if not results:
        raise DataError("facts", 0, "no traces", hint="trace at least one known fact")
    r = ROLES.index(role)
    rows = []
    for result in results:
        if name not in result.scores:
            rows.append(torch.full((result.n_layers,), torch.nan, dtype=torch.float64))
            continue
        if name in KNOCKOUT_NAMES:  # one row per fact (the relative drop of p), whatever the role
            rows.append(result.scores[name][0].double())
            continue
        sums, counts = role_sums(result, name)
        rows.append(sums[r] / counts[r] if counts[r] > 0 else torch.full_like(sums[r], torch.nan))
    return torch.stack(rows).float()
