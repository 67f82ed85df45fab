"""Attention knockout (Geva et al. 2023) on the clean run, batched: every (source set, layer window) in one forward.

A knockout blocks the attention edges from the last position to one source set of positions in
the window of layers centred on a layer, and reports the relative drop in p(answer),
``(p_knocked - p_clean) / p_clean``, at the window's centre. Savings, each exact:

* Only the last position's query row changes, so every earlier position is identical to the clean
  run at every layer, and the last position is identical below the window's first layer. A knocked
  run therefore starts at its window's first block from the clean run's residual state at the last
  position, computes that one position, and attends to the clean run's cached keys/values for the
  earlier positions (``models.blocks.PrefixCache``).
* All runs (sources x layers) join one staircase batch as the block loop reaches their first block;
  the edges are blocked through the one mask hook point, ``blocks.{l}.attn.hook_mask``.

``tracing.reference.reference_knockout`` (full model, a full 4D mask per window) is the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from core.errors import ConfigError
from core.memory import halving_map
from models.blocks import BlockStack, PrefixCache
from models.hooks import Hooks, HookFn
from tracing.settings import KNOCKOUT_SOURCES, knockout_key, window_layers

MASK_HOOK = "blocks.{layer}.attn.hook_mask"


@dataclass(frozen=True)
class KnockJob:
    """One knocked run: the source set ``name``, the layer it is reported at and its window."""

    name: str
    layer: int
    blocked: tuple[int, ...]  # key positions the last position may not attend to
    window: range


def plan_knockout(sources: Mapping[str, Sequence[int]], window: int, n_layers: int) -> list[KnockJob]:
    """A job per (source set, layer); sets without tokens get none (their drops are NaN)."""
    return [KnockJob(name, layer, tuple(positions), window_layers(layer, window, n_layers))
            for name, positions in sources.items() if positions for layer in range(n_layers)]


def check_sources(sources: Mapping[str, Sequence[int]]) -> None:
    """A knockout needs all three source sets (``tracing.spans.knockout_sources``)."""
    if sorted(sources) != sorted(KNOCKOUT_SOURCES):
        raise ConfigError("trace.kinds", "knockout", f"needs the source sets {', '.join(KNOCKOUT_SOURCES)}, got "
                          f"{sorted(sources) or 'none'}", hint="trace with a subject (tracing.trace / trace_fact), or pass "
                          "sources=tracing.spans.knockout_sources(...) to make_inputs")


def knockout_drops(stack: BlockStack, clean_resid: Tensor, clean_keys: list[Tensor], clean_values: list[Tensor],
                   sources: Mapping[str, Sequence[int]], window: int, answer_id: int, p_clean: float,
                   max_rows: int | None = None) -> dict[str, Tensor]:
    """``{knockout_<source>: [1 layer]}`` relative drops in p(answer); NaN rows for empty sources.

    ``clean_resid``: [layer+1 pos d_model] block inputs of the clean run; ``clean_keys`` /
    ``clean_values``: per layer [1 kv_heads pos head_dim].
    """
    check_sources(sources)
    n_layers = stack.n_layers
    jobs = plan_knockout(sources, window, n_layers)
    drops = {knockout_key(name): torch.full((1, n_layers), torch.nan) for name in sources}
    if not jobs:
        return drops
    def run(chunk: list[KnockJob]) -> list[float]:
        return _run_chunk(stack, clean_resid, clean_keys, clean_values, chunk, answer_id).tolist()

    probs = halving_map(run, jobs, max_rows or len(jobs), what="knockout_rows")
    for job, p in zip(jobs, probs):
        drops[knockout_key(job.name)][0, job.layer] = (p - p_clean) / p_clean
    return drops


def _run_chunk(stack: BlockStack, clean_resid: Tensor, clean_keys: list[Tensor], clean_values: list[Tensor],
               jobs: list[KnockJob], answer_id: int) -> Tensor:  # -> [job] p(answer)
    """Staircase batch of single-position runs: a job joins at its window's first block."""
    n_tokens = clean_resid.shape[1]
    last = n_tokens - 1
    kwargs = stack.position_kwargs(torch.arange(last, n_tokens, device=stack.device), last)
    state: Tensor | None = None  # [job 1 d_model]
    active: list[KnockJob] = []
    for block in range(stack.n_layers):
        entering = [job for job in jobs if job.window.start == block]
        if entering:
            new = clean_resid[block, last:][None].expand(len(entering), -1, -1).clone()
            state = new if state is None else torch.cat([state, new])
            active += entering
        if state is None:
            continue
        prefix = {block: tuple(kv[block][:, :, :last].expand(len(active), -1, -1, -1) for kv in (clean_keys, clean_values))}
        with Hooks(stack.model, stack.adapter, _block_hooks(block, active, n_tokens, stack.device)):
            state = stack.run_block(block, state, kwargs, PrefixCache(prefix))
    logits = stack.logits(state[:, -1]).float()  # [job vocab]
    probs = torch.exp(logits[:, answer_id] - torch.logsumexp(logits, dim=-1))
    order = {id(job): i for i, job in enumerate(active)}
    return probs[[order[id(job)] for job in jobs]]


def _block_hooks(block: int, active: list[KnockJob], n_tokens: int, device: torch.device) -> dict[str, HookFn]:
    """The mask hook of ``block``: rows whose window holds it lose their source keys."""
    blocked = torch.zeros(len(active), n_tokens, dtype=torch.bool, device=device)  # [job key]
    for row, job in enumerate(active):
        if block in job.window:
            blocked[row, list(job.blocked)] = True
    if not blocked.any():
        return {}

    def block_edges(allowed: Tensor, name: str) -> Tensor:  # allowed: [1 1 query=1 key]
        return allowed & ~blocked[:, None, None, :]

    return {MASK_HOOK.format(layer=block): block_edges}
