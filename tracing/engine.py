"""The batched causal-tracing engine: same numbers as ``tracing.reference``, a fraction of the work.

Savings, each exact (not approximations):

* A restoration at (token t, layer l) changes nothing below l and nothing before t (causal
  attention). A restored run therefore starts at its first affected block from the corrupted
  run's cached residual state, computes only positions >= t, and attends to the corrupted run's
  cached keys/values for positions < t (``models.blocks.PrefixCache``).
* Tokens before the first corrupted token are identical in the clean and corrupted runs, so
  restoring them is a no-op: their cells are the corrupted p without any forward pass.
* All restorations of one token (every layer, kind and severed variant) and all noise samples
  run as one batch that grows block by block as runs reach their start layer ("staircase").
* Only the last position is unembedded.

Attention knockout (kind ``knockout``) runs on the clean run's cache (``tracing.knockout``).

Batch size comes from a memory budget and halves on out-of-memory errors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from einops import rearrange, repeat
from torch import Tensor
from tqdm.auto import tqdm

from core.memory import free_memory, is_oom
from core.errors import ModelError
from models.blocks import BlockStack, PrefixCache, has_sliding_window
from models.hooks import Hooks, HookFn, recorder
from models.load import LoadedModel
from tracing.inputs import TraceInputs, TraceScores
from tracing.knockout import knockout_drops
from tracing.settings import TraceSettings, severed_key, window_layers

log = logging.getLogger(__name__)

CPU_BUDGET_BYTES = 2 * 2**30
LOGIT_CHUNK_ROWS = 256


@dataclass
class RunRecord:
    """Everything a restored run may start from or patch in: one full run (clean or corrupted)."""

    resid: Tensor  # [batch layer+1 pos d_model]: input of block j at [:, j]; [:, L] feeds the final norm
    keys: list[Tensor]  # per layer [batch kv_heads pos head_dim]
    values: list[Tensor]
    sublayers: dict[str, Tensor]  # "mlp" / "attn" -> [batch layer pos d_model]
    last_logits: Tensor  # [batch vocab] float32


@dataclass(frozen=True)
class Job:
    """One restored run of ``samples`` rows: which cell it fills and what it patches at token t."""

    name: str
    layer: int
    entry: int  # first block to run; n_layers means "straight to the logits"
    restore_hidden: bool  # the block input at ``entry`` gets the clean state at token t
    sublayer: str | None = None  # "mlp" / "attn": outputs patched at token t ...
    patched: range = range(0)  # ... in these layers ...
    from_clean: bool = True  # ... with clean values (restoration) or corrupted ones (severing)


def plan_jobs(settings: TraceSettings, n_layers: int) -> list[Job]:
    """The restored runs of one token, for every layer and every score name."""
    jobs = []
    for layer in range(n_layers):
        for kind in settings.restored:
            if kind == "hidden":
                jobs.append(Job("hidden", layer, layer + 1, True))
            else:
                window = window_layers(layer, settings.window, n_layers)
                jobs.append(Job(kind, layer, window.start, False, kind, window, True))
        for sublayer in settings.severed:
            jobs.append(Job(severed_key(sublayer), layer, layer + 1, True, sublayer, range(layer + 1, n_layers), False))
    return sorted(jobs, key=lambda job: job.entry)


def record_run(stack: BlockStack, token_embeds: Tensor, sublayers: Sequence[str]) -> RunRecord:
    """Run all blocks on ``token_embeds`` ([batch pos d_model]) and keep states, keys/values and sublayer outputs."""
    n_tokens = token_embeds.shape[1]
    positions = torch.arange(n_tokens, device=token_embeds.device)
    hidden = stack.block_input(token_embeds, positions)
    cache = PrefixCache(record=True)
    kwargs = stack.position_kwargs(positions, 0)
    store: dict[str, Tensor] = {}
    names = {s: [f"blocks.{layer}.hook_{s}_out" for layer in range(stack.n_layers)] for s in sublayers}
    resid = [hidden]
    with Hooks(stack.model, stack.adapter, {name: recorder(store) for s in sublayers for name in names[s]}):
        for layer in range(stack.n_layers):
            hidden = stack.run_block(layer, hidden, kwargs, cache)
            resid.append(hidden)
    return RunRecord(
        resid=torch.stack(resid, dim=1),
        keys=[cache.keys[layer] for layer in range(stack.n_layers)],
        values=[cache.values[layer] for layer in range(stack.n_layers)],
        sublayers={s: torch.stack([store[name] for name in names[s]], dim=1) for s in sublayers},
        last_logits=stack.logits(hidden[:, -1]).float(),
    )


@torch.no_grad()
def engine_scores(loaded: LoadedModel, inputs: TraceInputs, settings: TraceSettings, max_rows: int | None = None,
                  progress: bool = False) -> TraceScores:
    """Restored p(answer) for every (token, layer) cell of every score name in ``settings``."""
    if settings.knockout_names and has_sliding_window(loaded.model):
        raise ModelError("trace.kinds", "knockout", f"{loaded.identity.get('name')} has sliding-window attention layers, "
                         "which the knockout's batched runs do not reproduce yet",
                         hint="trace the other kinds, or use a model with global attention only")
    stack = BlockStack(loaded.model, loaded.adapter)
    n_layers, n_tokens, samples = stack.n_layers, inputs.n_tokens, settings.samples
    ids = inputs.token_ids.to(stack.device)[None]  # [1 pos]
    embeds = stack.token_embeddings(ids)  # [1 pos d_model]
    clean = record_run(stack, embeds, [k for k in settings.restored if k != "hidden"])
    answer_id = int(clean.last_logits[0].argmax()) if inputs.answer_id is None else inputs.answer_id
    p_clean = float(torch.softmax(clean.last_logits[0], -1)[answer_id])
    knocked = {}
    if settings.knockout_names:
        knocked = knockout_drops(stack, clean.resid[0], clean.keys, clean.values, inputs.sources, settings.window,
                                 answer_id, p_clean, max_rows)

    jobs = plan_jobs(settings, n_layers)
    if not jobs:  # a knockout alone needs no corrupted run
        return TraceScores(answer_id, p_clean, float("nan"), knocked)
    noisy = repeat(embeds[0], "pos d -> sample pos d", sample=samples).clone()
    noisy[:, list(inputs.positions)] += inputs.noise.to(device=stack.device, dtype=stack.dtype)
    corrupted = record_run(stack, noisy, list(settings.severed))
    p_corrupted = float(torch.softmax(corrupted.last_logits, -1)[:, answer_id].mean())

    scores = {name: torch.full((n_tokens, n_layers), p_corrupted) for name in settings.table_names}
    first = min(inputs.positions)
    rows = max_rows or _rows_from_memory(stack, n_tokens, samples)
    for t in tqdm(range(first, n_tokens), desc="trace tokens", disable=not progress, leave=False):
        p = _run_token(stack, clean, corrupted, t, jobs, samples, answer_id, max(1, rows // samples))
        for job, value in zip(jobs, p.tolist()):
            scores[job.name][t, job.layer] = value
    return TraceScores(answer_id, p_clean, p_corrupted, {**scores, **knocked})


def _run_token(stack: BlockStack, clean: RunRecord, corrupted: RunRecord, t: int, jobs: list[Job], samples: int,
               answer_id: int, max_jobs: int) -> Tensor:  # -> [job]
    """All jobs of token t in chunks of at most ``max_jobs`` jobs, halving the chunk on out-of-memory."""
    results: list[Tensor] = []
    start = 0
    while start < len(jobs):
        chunk = jobs[start:start + max_jobs]
        failed = False
        try:
            results.append(_run_chunk(stack, clean, corrupted, t, chunk, samples, answer_id))
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err) or max_jobs == 1:
                raise
            failed = True
        if failed:  # outside the except block, so the failed chunk's tensors are already unreachable
            max_jobs = max(1, max_jobs // 2)
            log.warning("out of memory at %d restored runs per batch; retrying with %d", len(chunk), max_jobs)
            free_memory()
            continue
        start += len(chunk)
    return torch.cat(results)


def _run_chunk(stack: BlockStack, clean: RunRecord, corrupted: RunRecord, t: int, jobs: list[Job], samples: int,
               answer_id: int) -> Tensor:  # -> [job]
    """Staircase batch: runs join when the loop reaches their entry block; positions >= t only."""
    n_layers, n_tokens = stack.n_layers, clean.resid.shape[2]
    positions = torch.arange(t, n_tokens, device=stack.device)
    kwargs = stack.position_kwargs(positions, t)
    state: Tensor | None = None  # [(job sample) pos d_model]
    active: list[Job] = []
    for block in range(n_layers + 1):
        entering = [job for job in jobs if job.entry == block]
        if entering:
            new = repeat(corrupted.resid[:, block, t:], "sample pos d -> (job sample) pos d", job=len(entering)).clone()
            restore = _row_mask([job.restore_hidden for job in entering], samples, stack.device)
            new[:, 0] = torch.where(restore[:, None], clean.resid[0, block, t], new[:, 0])
            state = new if state is None else torch.cat([state, new])
            active += entering
        if state is None or block == n_layers:
            continue
        prefix = {}
        if t > 0:
            prefix[block] = tuple(repeat(kv[block][:, :, :t], "sample h pos d -> (job sample) h pos d", job=len(active))
                                  for kv in (corrupted.keys, corrupted.values))
        with Hooks(stack.model, stack.adapter, _patch_hooks(block, active, clean, corrupted, t, samples)):
            state = stack.run_block(block, state, kwargs, PrefixCache(prefix))
    order = {id(job): i for i, job in enumerate(active)}
    probs = torch.cat([_p_answer(stack.logits(chunk).float(), answer_id)
                       for chunk in state[:, -1].split(LOGIT_CHUNK_ROWS)])  # [(job sample)]
    per_job = rearrange(probs, "(job sample) -> job sample", sample=samples).mean(dim=1)
    return per_job[[order[id(job)] for job in jobs]]


def _patch_hooks(block: int, active: list[Job], clean: RunRecord, corrupted: RunRecord, t: int,
                 samples: int) -> dict[str, HookFn]:
    """Hooks that overwrite the mlp/attn output at token t (suffix index 0) for the rows that patch ``block``."""
    hooks: dict[str, HookFn] = {}
    for sublayer in ("mlp", "attn"):
        wants = [job.sublayer == sublayer and block in job.patched for job in active]
        if not any(wants):
            continue
        from_clean = [w and job.from_clean for w, job in zip(wants, active)]
        device = clean.resid.device
        clean_rows = _row_mask(from_clean, samples, device)
        frozen_rows = _row_mask([w and not c for w, c in zip(wants, from_clean)], samples, device)
        clean_value = clean.sublayers[sublayer][0, block, t] if any(from_clean) else None  # [d_model]
        frozen_value = (repeat(corrupted.sublayers[sublayer][:, block, t], "sample d -> (job sample) d", job=len(active))
                        if frozen_rows.any() else None)

        def patch(tensor: Tensor, name: str, clean_rows=clean_rows, frozen_rows=frozen_rows,
                  clean_value=clean_value, frozen_value=frozen_value) -> Tensor:  # tensor: [(job sample) pos d_model]
            first = tensor[:, 0]
            if clean_value is not None:
                first = torch.where(clean_rows[:, None], clean_value, first)
            if frozen_value is not None:
                first = torch.where(frozen_rows[:, None], frozen_value, first)
            return torch.cat([first[:, None], tensor[:, 1:]], dim=1)

        hooks[f"blocks.{block}.hook_{sublayer}_out"] = patch
    return hooks


def _p_answer(logits: Tensor, answer_id: int) -> Tensor:  # logits: [batch vocab] -> [batch]
    return torch.exp(logits[:, answer_id] - torch.logsumexp(logits, dim=-1))


def _row_mask(per_job: list[bool], samples: int, device: torch.device) -> Tensor:  # -> [(job sample)]
    return torch.tensor(per_job, device=device).repeat_interleave(samples)


def _rows_from_memory(stack: BlockStack, n_tokens: int, samples: int) -> int:
    """Rows per batch from free accelerator memory (half of it) or a fixed CPU budget."""
    adapter = stack.adapter
    element = torch.finfo(stack.dtype).bits // 8
    # activations of one row through one block (+ the prefix keys/values it attends to)
    per_row = n_tokens * (12 * adapter.d_model + 3 * adapter.d_mlp) * element
    if stack.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(stack.device)
        budget = free // 2
    else:
        budget = CPU_BUDGET_BYTES
    return max(samples, int(budget // per_row))
