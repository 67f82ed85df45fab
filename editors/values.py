"""Values: optimise the vector added at the lookup token so that the model predicts the targets.

``optimize_values`` adds a learned ``delta`` to the activation ``hook`` (ROME:
``blocks.{l}.mlp.hook_out``, the rewritten weight's output; MEMIT: ``blocks.{L}.hook_resid_post``) at the lookup token of every
rewriting prompt (each context template x each rewrite) and of the KL prompts ("{} is a"), and
minimises, per request (ROME's compute_v)::

    NLL(targets) + kl_factor * KL(p_now || p_before) at the KL prompts' lookup token
                 + weight_decay * ||delta|| / ||v_init||^2,     ||delta|| <= clamp * ||v_init||

``steps`` forwards are run and ``steps - 1`` Adam updates (the last forward only measures), and a
request stops as soon as its loss is below ``early_stop_loss`` -- as the authors' code does.

Speed: nothing that the delta cannot change is recomputed. Every position before the lookup
token is independent of the delta (causal attention), so those "heads" are run once, left-padded
to a common length so the lookup token lands at the same column for every row, and kept as a KV
cache; each step forwards only the "tails" (lookup token .. last target token, a few tokens per
row) and computes logits only at the positions the loss reads. Several requests are optimised
together as independent rows with their own deltas (the loss is a sum of per-request terms and
Adam is element-wise, so this equals optimising them one by one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from editors.config import ValueSettings
from editors.keys import encode_prompt, request_contexts
from editors.requests import EditRequest
from models.blocks import cache_state, restore_cache_state
from models.hooks import Hooks
from models.load import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class ValueResult:
    target: Tensor  # [d] v* = v_init + delta
    init: Tensor  # [d] the activation at the bare prompt's lookup token before the edit
    delta: Tensor  # [d]
    losses: list[float] = field(default_factory=list)
    target_prob: float = 0.0  # mean probability of the targets at the last forward

    def info(self) -> dict:
        return {"steps": len(self.losses), "loss_first": self.losses[0], "loss_last": self.losses[-1],
                "target_prob": self.target_prob, "delta_norm": float(self.delta.norm()), "init_norm": float(self.init.norm())}


@dataclass
class _Rows:
    """The rewriting and KL rows of a group of requests, split at the lookup token."""

    head: Tensor  # [row H] left-padded
    head_mask: Tensor
    tail: Tensor  # [row T] right-padded; column 0 is the lookup token
    tail_mask: Tensor
    owner: Tensor  # [row] request index
    target_rows: Tensor  # [n] (row, tail column, token id) of every target token
    target_cols: Tensor
    target_ids: Tensor
    target_norm: Tensor  # [n] 1 / target length of its row
    kl_rows: Tensor  # [k]
    rewrite_rows: Tensor  # [r] rows with targets
    first_rows: Tensor  # [request] the bare prompt of each request's first rewrite


def rewrite_targets(tokenizer, request: EditRequest, relation_removal: str = "spaced") -> list[tuple[list[int], int]]:
    """Per rewrite: (target token ids, the length its rows' NLL is divided by).

    ``spaced``: every target gets a leading space and is averaged over its own tokens.
    ``authors`` (RaKE's compute_v_rel): the removal target is tokenized as given (``tok("None")``),
    and its rows are divided by the first (add) target's length, as every row is in their code.
    """
    authors = relation_removal == "authors"
    ids = [tokenizer(r.target if r.removal and authors else " " + r.target, add_special_tokens=False)["input_ids"]
           for r in request.rewrites]
    return [(t, len(ids[0]) if r.removal and authors else len(t)) for r, t in zip(request.rewrites, ids)]


def _build_rows(loaded: LoadedModel, requests: Sequence[EditRequest], contexts: Sequence[str],
                kl_prompts: Sequence[str], relation_removal: str = "spaced") -> _Rows:
    tokenizer = loaded.tokenizer
    rows: list[tuple[int, list[int], int, list[int] | None, int]] = []  # owner, ids, lookup, target ids (None = KL), NLL divisor
    first_rows = []
    for index, request in enumerate(requests):
        first_rows.append(len(rows))
        for rewrite, (target, length) in zip(request.rewrites, rewrite_targets(tokenizer, request, relation_removal)):
            for context in request_contexts(contexts, rewrite.n_contexts):
                prompt = encode_prompt(tokenizer, context, rewrite.template, request.subject, request.lookup)
                rows.append((index, prompt.ids + target[:-1], prompt.lookup, target, length))
        for kl_prompt in kl_prompts:
            prompt = encode_prompt(tokenizer, "{}", kl_prompt, request.subject, request.lookup)
            rows.append((index, prompt.ids, prompt.lookup, None, 0))
    pad = tokenizer.pad_token_id
    heads = [ids[:lookup] for _, ids, lookup, *_ in rows]
    tails = [ids[lookup:] for _, ids, lookup, *_ in rows]
    width_h, width_t = max(map(len, heads)), max(map(len, tails))
    device = loaded.device

    def tensor(values) -> Tensor:
        return torch.tensor(values, device=device, dtype=torch.long)

    t_rows, t_cols, t_ids, t_norm = [], [], [], []
    for row, (_, ids, lookup, target, length) in enumerate(rows):
        if target is None:
            continue
        first = len(ids) - len(target)  # tail column of the position that predicts target[0]
        for j, token in enumerate(target):
            t_rows.append(row)
            t_cols.append(first - lookup + j)
            t_ids.append(token)
            t_norm.append(1.0 / length)
    return _Rows(
        head=tensor([[pad] * (width_h - len(h)) + h for h in heads]),
        head_mask=tensor([[0] * (width_h - len(h)) + [1] * len(h) for h in heads]),
        tail=tensor([t + [pad] * (width_t - len(t)) for t in tails]),
        tail_mask=tensor([[1] * len(t) + [0] * (width_t - len(t)) for t in tails]),
        owner=tensor([owner for owner, *_ in rows]),
        target_rows=tensor(t_rows), target_cols=tensor(t_cols), target_ids=tensor(t_ids),
        target_norm=torch.tensor(t_norm, device=device),
        kl_rows=tensor([i for i, row in enumerate(rows) if row[3] is None]),
        rewrite_rows=tensor([i for i, row in enumerate(rows) if row[3] is not None]),
        first_rows=tensor(first_rows),
    )


class _TailModel:
    """Forward of the tails over a cached head; returns final-norm states at the tail columns."""

    def __init__(self, loaded: LoadedModel, rows: _Rows) -> None:
        self.loaded, self.rows = loaded, rows
        mask = torch.cat([rows.head_mask, rows.tail_mask], dim=1)  # [row H+T]
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        self.mask, self.width_h = mask, rows.head.shape[1]
        self.tail_positions = positions[:, self.width_h:]
        self.cache = None
        if self.width_h:
            with torch.no_grad():
                out = loaded.model(input_ids=rows.head, attention_mask=rows.head_mask, position_ids=positions[:, :self.width_h],
                                   use_cache=True)
            self.cache = out.past_key_values
            self.saved = cache_state(self.cache)

    def __call__(self, hooks: dict) -> Tensor:
        store: dict[str, Tensor] = {}

        def keep(tensor: Tensor, name: str) -> None:
            store[name] = tensor

        fns = {**hooks, "hook_final_norm": keep}
        kwargs = {"cache": self.cache, "use_cache": True} if self.cache is not None else {"use_cache": False}
        try:
            with Hooks(self.loaded.model, self.loaded.adapter, fns, stop_after="hook_final_norm"):
                self.loaded.model(input_ids=self.rows.tail, attention_mask=self.mask, position_ids=self.tail_positions, **kwargs)
        finally:
            if self.cache is not None:  # back to the head only (and out of this step's autograd graph)
                restore_cache_state(self.cache, self.saved)
        return store["hook_final_norm"]  # [row T d_model]


def optimize_values(loaded: LoadedModel, requests: Sequence[EditRequest], contexts: Sequence[str], hook: str,
                    settings: ValueSettings) -> list[ValueResult]:
    """v* for each request (optimised jointly as independent rows; see the module docstring)."""
    rows = _build_rows(loaded, requests, contexts, settings.kl_prompts, settings.relation_removal)
    tail_model = _TailModel(loaded, rows)
    unembed = loaded.adapter.module(loaded.model, "unembed")
    n = len(requests)
    d_model = loaded.adapter.d_model
    delta = torch.zeros(n, d_model, device=loaded.device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=settings.lr)
    init: Tensor | None = None
    kl_init: Tensor | None = None
    active = torch.ones(n, dtype=torch.bool, device=loaded.device)
    losses: list[list[float]] = [[] for _ in range(n)]
    probs = torch.zeros(n, device=loaded.device)
    row_count = torch.zeros(n, device=loaded.device).index_add_(0, rows.owner[rows.rewrite_rows],
                                                                 torch.ones(len(rows.rewrite_rows), device=loaded.device))
    kl_count = torch.zeros(n, device=loaded.device).index_add_(0, rows.owner[rows.kl_rows],
                                                               torch.ones(len(rows.kl_rows), device=loaded.device))

    def insert(tensor: Tensor, name: str) -> Tensor:
        nonlocal init
        if init is None:
            init = tensor[rows.first_rows, 0].detach().float().clone()  # [request d_model]
        onehot = torch.zeros(tensor.shape[1], device=tensor.device, dtype=tensor.dtype)
        onehot[0] = 1
        return tensor + delta[rows.owner].to(tensor.dtype)[:, None, :] * onehot[None, :, None]

    with torch.enable_grad():
        for step in range(settings.steps):
            optimizer.zero_grad()
            states = tail_model({hook: insert})  # [row T d_model]
            target_logits = unembed(states[rows.target_rows, rows.target_cols]).float()  # [n vocab]
            token_logp = target_logits.log_softmax(-1).gather(1, rows.target_ids[:, None])[:, 0]
            row_nll = torch.zeros(len(rows.owner), device=loaded.device).index_add(0, rows.target_rows, -token_logp * rows.target_norm)
            nll = torch.zeros(n, device=loaded.device).index_add(0, rows.owner[rows.rewrite_rows], row_nll[rows.rewrite_rows]) / row_count
            kl_logp = unembed(states[rows.kl_rows, 0]).float().log_softmax(-1)  # [k vocab]
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            row_kl = F.kl_div(kl_init, kl_logp, log_target=True, reduction="none").sum(-1)
            kl = torch.zeros(n, device=loaded.device).index_add(0, rows.owner[rows.kl_rows], row_kl) / kl_count.clamp(min=1)
            decay = settings.weight_decay * delta.norm(dim=1) / init.norm(dim=1) ** 2
            loss = nll + settings.kl_factor * kl + decay  # [request]
            with torch.no_grad():
                row_prob = torch.exp(-row_nll[rows.rewrite_rows])
                probs = torch.zeros(n, device=loaded.device).index_add(0, rows.owner[rows.rewrite_rows], row_prob) / row_count
                for i in torch.nonzero(active).flatten().tolist():
                    losses[i].append(float(loss[i]))
                active &= loss.detach() >= settings.early_stop_loss
            if step == settings.steps - 1 or not active.any():
                break
            before = delta.detach().clone()
            (loss * active).sum().backward()
            optimizer.step()
            with torch.no_grad():
                delta[~active] = before[~active]  # finished requests keep their delta (Adam momentum would move it)
                max_norm = settings.clamp_norm_factor * init.norm(dim=1, keepdim=True)
                norm = delta.norm(dim=1, keepdim=True)
                delta.copy_(torch.where(norm > max_norm, delta * max_norm / norm, delta))
    delta = delta.detach()
    return [ValueResult(init[i] + delta[i], init[i], delta[i], losses[i], float(probs[i])) for i in range(n)]
