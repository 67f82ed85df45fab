"""Batched scoring of target strings: mean per-token NLL of ``" " + target`` after a prompt.

This is the one place where evaluation runs forward passes; ``metrics/`` only sees the NLLs.

Token boundary (as ROME's ``test_batch_prediction`` intends): the prompt and ``" " + target``
are tokenized *separately* and their ids concatenated, so the target's tokens are exactly the
ones scored whatever the tokenizer would merge across the boundary. Targets carry no leading
space (the ``Fact`` convention); the space is added here, once.

Two paths give the same numbers (tested to fp32 precision):

- ``target_nll``: one right-padded sequence per (prompt, target) pair; the general case.
- ``candidate_nll``: K candidate targets for each prompt. Each prompt runs once; its last
  position scores every candidate's first token, and its KV cache is shared by the candidates'
  remaining tokens (cache rows selected per (prompt, candidate) pair, candidates bucketed by
  length so no position is padding). Single-token candidates cost no extra position at all. For
  the 35-way relation rank this is ~4x faster than concatenating prompt and candidate
  (``benchmarks/bench_scoring.py`` measures it side by side).

Only the positions that predict target tokens go through the unembedding (``hidden -> logits``
is ~30% of SmolLM2's compute per position), and log-softmax runs in float32.

Batches go through ``core.memory.halving_map``: an accelerator out-of-memory halves the batch and
retries it rather than ending the run. Each row is right-padded and masked, so its score does
not depend on which batch it lands in (up to floating-point rounding).
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Literal, Sequence

import torch
from einops import rearrange
from torch import Tensor
from tqdm.auto import tqdm

from core.errors import DataError
from core.memory import halving_map
from models.blocks import has_sliding_window
from models.load import LoadedModel

log = logging.getLogger(__name__)

Method = Literal["cache", "concat"]


# -- tokenization ------------------------------------------------------------------------------
def encode_prompts(loaded: LoadedModel, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt (with the tokenizer's own special tokens, e.g. a BOS)."""
    ids = loaded.tokenizer(list(prompts))["input_ids"] if prompts else []
    for index, row in enumerate(ids):
        if not row:
            raise DataError("prompt", prompts[index], "tokenizes to no tokens, so nothing predicts the target",
                            hint="scoring needs a non-empty prompt")
    return [list(row) for row in ids]


def encode_targets(loaded: LoadedModel, targets: Sequence[str]) -> list[list[int]]:
    """Token ids of ``" " + target`` without special tokens (targets carry no leading space)."""
    for target in targets:
        if not isinstance(target, str) or not target.strip():
            raise DataError("target", target, "empty target string", hint="every target needs at least one character")
        if target != target.lstrip():
            raise DataError("target", target, "target starts with whitespace",
                            hint="pass targets without the leading space; scoring adds ' ' itself")
    if not targets:
        return []
    ids = loaded.tokenizer([" " + target for target in targets], add_special_tokens=False)["input_ids"]
    return [list(row) for row in ids]


# -- forward helpers ----------------------------------------------------------------------------
def _hidden(loaded: LoadedModel, input_ids: Tensor, attention_mask: Tensor, **kwargs):
    """Final-norm hidden states (hooks on ``hook_final_norm`` apply); logits are computed lazily."""
    return loaded.model.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def _cache_keyword(loaded: LoadedModel) -> str:
    """transformers >= 5.2x names the KV cache ``cache``; older releases ``past_key_values``."""
    parameters = inspect.signature(loaded.model.base_model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _token_logprobs(loaded: LoadedModel, hidden: Tensor, next_ids: Tensor) -> Tensor:
    """log p(next_ids[i] | hidden[i]) for gathered positions.  hidden: [n d_model] -> [n]"""
    unembed = loaded.adapter.module(loaded.model, "unembed")
    logits = unembed(hidden).float()  # [n vocab]
    return torch.log_softmax(logits, dim=-1).gather(-1, next_ids[:, None]).squeeze(-1)


def _pad_right(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[index, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(loaded: LoadedModel) -> int:
    tokenizer = loaded.tokenizer
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


# -- one sequence per (prompt, target) ------------------------------------------------------------
@torch.no_grad()
def target_nll(loaded: LoadedModel, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 64,
               progress: bool = False) -> Tensor:
    """Mean per-token NLL of ``" " + targets[i]`` after ``prompts[i]``.  -> [n] float32 (CPU)

    Pairs are sorted by length so batches carry little padding; the result keeps input order.
    """
    if len(prompts) != len(targets):
        raise DataError("targets", len(targets), f"{len(prompts)} prompts but {len(targets)} targets",
                        hint="pass one target per prompt")
    prompt_ids, target_ids = encode_prompts(loaded, prompts), encode_targets(loaded, targets)
    return _concat_nll(loaded, prompt_ids, target_ids, batch_size, progress, desc="target nll")


def _concat_nll(loaded: LoadedModel, prompt_ids: list[list[int]], target_ids: list[list[int]], batch_size: int,
                progress: bool, desc: str) -> Tensor:
    n = len(prompt_ids)
    result = torch.empty(n, dtype=torch.float32)
    if n == 0:
        return result
    order = sorted(range(n), key=lambda i: len(prompt_ids[i]) + len(target_ids[i]))
    pad_id, device = _pad_id(loaded), loaded.device
    bar = tqdm(total=n, desc=desc, disable=not progress, leave=False)

    def score(batch: list[int]) -> list[Tensor]:  # -> [batch] of scalars
        ids, mask = _pad_right([prompt_ids[i] + target_ids[i] for i in batch], pad_id, device)  # [batch pos]
        hidden = _hidden(loaded, ids, mask).last_hidden_state  # [batch pos d_model]
        rows, positions = [], []
        for row, index in enumerate(batch):
            start, count = len(prompt_ids[index]), len(target_ids[index])
            # Position p predicts token p + 1: the target's tokens sit at start .. start+count-1.
            rows += [row] * count
            positions += range(start - 1, start + count - 1)
        rows_t, positions_t = torch.tensor(rows, device=device), torch.tensor(positions, device=device)
        logprobs = _token_logprobs(loaded, hidden[rows_t, positions_t], ids[rows_t, positions_t + 1])  # [tokens]
        sums = torch.zeros(len(batch), dtype=torch.float32).index_add_(0, rows_t.cpu(), logprobs.cpu())
        counts = torch.tensor([len(target_ids[i]) for i in batch], dtype=torch.float32)
        bar.update(len(batch))
        return list((-sums / counts).unbind())

    with bar:
        result[torch.tensor(order)] = torch.stack(halving_map(score, order, batch_size))
    return result


# -- K candidates per prompt ----------------------------------------------------------------------
@torch.no_grad()
def candidate_nll(loaded: LoadedModel, prompts: Sequence[str], candidates: Sequence[Sequence[str]],
                  batch_size: int = 256, method: Method = "cache", progress: bool = False) -> Tensor:
    """Mean per-token NLL of each of K candidates after each prompt.  -> [n_prompts K] float32 (CPU)

    ``candidates[i]`` lists prompt i's K targets (the same K for every prompt; pass the same list
    n times for a shared candidate set). ``batch_size`` counts (prompt, candidate) rows, so a
    batch holds ``batch_size // K`` prompts. ``method="concat"`` scores every pair as one
    sequence (the reference); ``"cache"`` runs each prompt once and shares its KV cache. Models
    with sliding-window layers are always scored by ``"concat"``: the shared cache is row-selected
    and extended by hand, which their window-limited cache layers do not support.
    """
    if len(candidates) != len(prompts):
        raise DataError("candidates", len(candidates), f"{len(prompts)} prompts but {len(candidates)} candidate lists",
                        hint="pass one candidate list per prompt")
    sizes = {len(options) for options in candidates}
    if len(sizes) > 1 or 0 in sizes:
        raise DataError("candidates", sorted(sizes), "every prompt needs the same, non-zero number of candidates",
                        hint="pad candidate lists to one size or call once per size")
    k = sizes.pop() if sizes else 0
    if not prompts:
        return torch.empty((0, k), dtype=torch.float32)
    prompt_ids = encode_prompts(loaded, prompts)
    unique = sorted({target for options in candidates for target in options})
    unique_ids = dict(zip(unique, encode_targets(loaded, unique)))
    candidate_ids = [[unique_ids[target] for target in options] for options in candidates]
    if method == "cache" and has_sliding_window(loaded.model):
        method = "concat"
    if method == "concat":
        flat = _concat_nll(loaded, [row for row in prompt_ids for _ in range(k)],
                           [ids for options in candidate_ids for ids in options], batch_size, progress, "candidate nll")
        return flat.view(len(prompts), k)
    if method != "cache":
        raise DataError("method", method, "unknown scoring method", hint="use cache or concat")
    return _cached_nll(loaded, prompt_ids, candidate_ids, max(1, batch_size // k), progress)


def _cached_nll(loaded: LoadedModel, prompt_ids: list[list[int]], candidate_ids: list[list[list[int]]],
                prompts_per_batch: int, progress: bool) -> Tensor:
    n, k = len(prompt_ids), len(candidate_ids[0])
    result = torch.empty((n, k), dtype=torch.float32)
    order = sorted(range(n), key=lambda i: len(prompt_ids[i]))
    pad_id, device = _pad_id(loaded), loaded.device
    bar = tqdm(total=n, desc="candidate nll", disable=not progress, leave=False)

    def score(batch: list[int]) -> list[Tensor]:  # -> [prompt] of [K]
        ids, mask = _pad_right([prompt_ids[i] for i in batch], pad_id, device)  # [prompt pos]
        out = _hidden(loaded, ids, mask, use_cache=True)
        lengths = torch.tensor([len(prompt_ids[i]) for i in batch], device=device)
        last = out.last_hidden_state[torch.arange(len(batch), device=device), lengths - 1]  # [prompt d_model]
        unembed = loaded.adapter.module(loaded.model, "unembed")
        first = torch.log_softmax(unembed(last).float(), dim=-1)  # [prompt vocab]
        first_ids = torch.tensor([[candidate_ids[i][c][0] for c in range(k)] for i in batch], device=device)
        sums = first.gather(-1, first_ids).cpu()  # [prompt K]
        # Later tokens: only (prompt, candidate) rows with >= 2 tokens, fed all but their last token,
        # bucketed by length so no position is padding (the prompt cache is copied per bucket).
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        buckets: dict[int, list[tuple[int, int]]] = {}
        for row, index in enumerate(batch):
            for c in range(k):
                if len(candidate_ids[index][c]) > 1:
                    buckets.setdefault(len(candidate_ids[index][c]) - 1, []).append((row, c))
        for number, pairs in enumerate(buckets.values()):
            bucket_cache = cache if number == len(buckets) - 1 else copy.deepcopy(cache)
            feeds = [candidate_ids[batch[row]][c] for row, c in pairs]
            logprobs = _continue_from_cache(loaded, bucket_cache, mask, lengths, [row for row, _ in pairs], feeds)
            owners = torch.tensor([row * k + c for row, c in pairs])
            sums = sums.flatten().index_add_(0, owners, logprobs.sum(dim=1)).view(len(batch), k)
        counts = torch.tensor([[len(candidate_ids[i][c]) for c in range(k)] for i in batch], dtype=torch.float32)
        bar.update(len(batch))
        return list((-sums / counts).unbind())

    with bar:
        result[torch.tensor(order)] = torch.stack(halving_map(score, order, prompts_per_batch))
    return result


def _continue_from_cache(loaded: LoadedModel, cache, prompt_mask: Tensor, prompt_lengths: Tensor, rows: list[int],
                         targets: list[list[int]]) -> Tensor:
    """log p(targets[i][1:]) after prompt ``rows[i]`` whose keys/values are in ``cache``.  -> [pair step]

    Every target has the same length; ``cache`` is consumed (rows selected, then extended).
    prompt_mask: [prompt pos], prompt_lengths: [prompt]
    """
    device = prompt_mask.device
    prompt_rows = torch.tensor(rows, device=device)
    cache.batch_select_indices(prompt_rows)  # [pair ...]: each pair reads its prompt's keys/values
    tokens = torch.tensor(targets, device=device)  # [pair target_pos]
    feed, following = tokens[:, :-1], tokens[:, 1:]  # [pair step]
    steps = feed.shape[1]
    attention = torch.cat([prompt_mask[prompt_rows], torch.ones_like(feed)], dim=1)  # [pair prompt_pos+step]
    position_ids = prompt_lengths[prompt_rows, None] + torch.arange(steps, device=device)[None, :]  # [pair step]
    hidden = _hidden(loaded, feed, attention, position_ids=position_ids, use_cache=False,
                     **{_cache_keyword(loaded): cache}).last_hidden_state  # [pair step d_model]
    logprobs = _token_logprobs(loaded, rearrange(hidden, "pair step d -> (pair step) d"), following.flatten())
    return rearrange(logprobs, "(pair step) -> pair step", step=steps).cpu()


# -- general ability: mean NLL of a token stream ------------------------------------------------------
@torch.no_grad()
def stream_nll(loaded: LoadedModel, tokens: Tensor, window: int = 512, batch_size: int = 1) -> float:
    """Mean per-token NLL (nats) of a token stream, cut into consecutive non-overlapping windows.

    tokens: [pos] int. ``window`` is capped at the model's context length. Each window is one sequence with no context from the previous one, so its
    first token is not predicted; every other token is, once. A last, shorter window is scored
    too (alone, so no window is padded). Windows of one batch share their length; an accelerator
    out-of-memory halves the batch (``core.memory.halving_map``). Every predicting position goes
    through the full unembedding (float32 log-softmax, ``pos x vocab`` per window: ~100 MB for a
    512-token window of a 49k vocabulary), hence the small default batch.
    """
    if tokens.ndim != 1 or tokens.numel() < 2:
        raise DataError("tokens", tuple(tokens.shape), "needs a 1-d stream of at least 2 tokens",
                        hint="pass the held-out text's token ids")
    if window < 2:
        raise DataError("window", window, "a window needs at least 2 tokens", hint="e.g. 512")
    config = loaded.model.config
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    window = min(window, context) if context else window  # never past the model's positions
    tokens = tokens.to(loaded.device)
    full = tokens.numel() // window
    windows = [tokens[i * window:(i + 1) * window] for i in range(full)]
    if tokens.numel() - full * window >= 2:
        windows.append(tokens[full * window:])

    def score(batch: list[Tensor]) -> list[Tensor]:  # -> [batch] of NLL sums (float64)
        ids = torch.stack(batch)  # [batch pos]
        hidden = _hidden(loaded, ids, torch.ones_like(ids)).last_hidden_state[:, :-1]  # [batch pos-1 d_model]
        logprobs = _token_logprobs(loaded, rearrange(hidden, "b p d -> (b p) d"), ids[:, 1:].flatten())
        return list((-rearrange(logprobs, "(b p) -> b p", b=len(batch)).double().sum(dim=1)).cpu().unbind())

    total, count = 0.0, 0
    groups: dict[int, list[Tensor]] = {}
    for item in windows:  # equal lengths per batch: no padding
        groups.setdefault(item.numel(), []).append(item)
    for length, same_length in groups.items():
        total += float(sum(halving_map(score, same_length, batch_size, what="quality.nll_batch")))
        count += (length - 1) * len(same_length)
    return total / count
