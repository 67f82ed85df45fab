"""Slow reference of the value optimisation: one request, full prompts, full logits (the authors'
compute_v structure). Tests compare ``values.optimize_values`` against it; the benchmark uses it
as the baseline. Not used by the editors.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from editors.keys import encode_prompt, request_contexts
from editors.requests import EditRequest
from editors.config import ValueSettings
from editors.values import ValueResult, rewrite_targets
from models.hooks import Hooks
from models.load import LoadedModel


def optimize_value_reference(loaded: LoadedModel, request: EditRequest, contexts: Sequence[str], hook: str,
                             settings: ValueSettings) -> ValueResult:
    tokenizer, device = loaded.tokenizer, loaded.device
    rows, targets = [], []
    for rewrite, (target, length) in zip(request.rewrites, rewrite_targets(tokenizer, request, settings.relation_removal)):
        for context in request_contexts(contexts, rewrite.n_contexts):
            prompt = encode_prompt(tokenizer, context, rewrite.template, request.subject, request.lookup)
            rows.append((prompt.ids + target[:-1], prompt.lookup))
            targets.append((len(prompt.ids) - 1, target, length))
    n_rewrite = len(rows)
    rows += [(p.ids, p.lookup) for p in (encode_prompt(tokenizer, "{}", k, request.subject, request.lookup)
                                         for k in settings.kl_prompts)]
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows], device=device)  # [row pos]
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows], device=device)
    lookups = [lookup for _, lookup in rows]
    delta = torch.zeros(loaded.adapter.d_model, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=settings.lr)
    init: Tensor | None = None
    kl_init: Tensor | None = None
    losses: list[float] = []
    prob = 0.0

    def insert(tensor: Tensor, name: str) -> Tensor:
        nonlocal init
        if init is None:
            init = tensor[0, lookups[0]].detach().float().clone()
        tensor = tensor.clone()
        for row, lookup in enumerate(lookups):
            tensor[row, lookup] = tensor[row, lookup] + delta.to(tensor.dtype)
        return tensor

    with torch.enable_grad():
        for step in range(settings.steps):
            optimizer.zero_grad()
            with Hooks(loaded.model, loaded.adapter, {hook: insert}):
                logits = loaded.model(input_ids=input_ids, attention_mask=mask).logits.float()  # [row pos vocab]
            log_probs = logits.log_softmax(-1)
            nll_rows = torch.stack([-sum(log_probs[row, first + j, token] for j, token in enumerate(target)) / length
                                    for row, (first, target, length) in enumerate(targets)])
            kl_logp = torch.stack([log_probs[row, lookups[row]] for row in range(n_rewrite, len(rows))])
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            kl = F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
            loss = nll_rows.mean() + settings.kl_factor * kl + settings.weight_decay * delta.norm() / init.norm() ** 2
            losses.append(float(loss.detach()))
            prob = float(torch.exp(-nll_rows.detach()).mean())
            if loss < settings.early_stop_loss or step == settings.steps - 1:
                break
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                max_norm = settings.clamp_norm_factor * init.norm()
                if delta.norm() > max_norm:
                    delta[...] = delta * max_norm / delta.norm()
    delta = delta.detach()
    return ValueResult(init + delta, init, delta, losses, prob)
