"""FT (constrained fine-tuning, ROME's "FT-L"): Adam on one MLP output projection, L-inf bounded.

The rewritten weights W (``editor.layers``, the paper's layer 0 for GPT-2 XL) are trained to
minimise the mean per-token NLL of ``" " + target`` after each rewrite prompt (teacher forced,
tokenized exactly as ``models.scoring`` scores it; ``target_positions: prompt_last`` reads every
target token at the prompt's last position and ``train_bias`` adds the projection's bias, as the
authors' ft_main does: tests/fixtures/ft/README.md), and after every Adam step they are clamped
to ``W0 - eps <= W <= W0 + eps`` (``norm_constraint`` eps; Zhu et al. 2020, ROME's FT-L). The
loop stops as soon as the loss is below ``early_stop_loss`` (the target is reached: mean p > 0.99
at 0.01). Relation requests carry the add prompt and the removal prompt; ``rewrites: main``
trains on the add prompt -> relation phrase only, as the authors' FT does; ``all`` uses both.

``target_batch``/``target_nll_rows`` (teacher-forced NLL of targets after prompts) are shared
with KN and MEND.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor

from editors.base import Editor
from editors.config import FtConfig
from editors.deltas import WeightDeltas, parameters
from editors.requests import EditRequest
from models.load import LoadedModel
from models.scoring import encode_prompts, encode_targets

log = logging.getLogger(__name__)

RewriteChoice = Literal["main", "all"]


# ------------------------------------------------------------------------------ shared helpers
@dataclass
class TargetBatch:
    """Right-padded ``prompt + target[:-1]`` rows and the (row, position, id) of every target token."""

    input_ids: Tensor  # [batch pos]
    attention_mask: Tensor  # [batch pos]
    token_rows: Tensor  # [n] row of each target token
    token_cols: Tensor  # [n] position whose logits predict it
    token_ids: Tensor  # [n]
    token_weight: Tensor  # [n] 1 / (target length of its row): a row's NLL is the mean over its tokens
    prompt_lengths: list[int]
    target_ids: list[list[int]]

    @property
    def n_rows(self) -> int:
        return self.input_ids.shape[0]

    def inputs(self) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def target_batch(loaded: LoadedModel, prompts: Sequence[str], targets: Sequence[str], prompt_last: bool = False) -> TargetBatch:
    """Tokenize prompts and ``" " + target`` separately (as the evaluation scores them) and join them.

    ``prompt_last``: the rows are the prompts alone and every target token is read at the prompt's
    last position (the authors' ft_main; see ``FtConfig.target_positions``).
    """
    prompt_ids, target_ids = encode_prompts(loaded, list(prompts)), encode_targets(loaded, list(targets))
    rows = [p if prompt_last else p + t[:-1] for p, t in zip(prompt_ids, target_ids)]
    width = max(map(len, rows))
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    token_rows, token_cols, token_ids, weights = [], [], [], []
    for row, (p, t) in enumerate(zip(prompt_ids, target_ids)):
        for j, token in enumerate(t):
            token_rows.append(row)
            token_cols.append(len(p) - 1 + (0 if prompt_last else j))
            token_ids.append(token)
            weights.append(1.0 / len(t))
    device = loaded.device

    def long(values) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return TargetBatch(
        input_ids=long([r + [pad] * (width - len(r)) for r in rows]),
        attention_mask=long([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        token_rows=long(token_rows), token_cols=long(token_cols), token_ids=long(token_ids),
        token_weight=torch.tensor(weights, device=device), prompt_lengths=[len(p) for p in prompt_ids], target_ids=target_ids,
    )


def target_nll_rows(logits: Tensor, batch: TargetBatch) -> Tensor:
    """Mean NLL of each row's target tokens.  logits: [batch pos vocab] -> [batch]"""
    picked = logits[batch.token_rows, batch.token_cols].float().log_softmax(-1)  # [n vocab]
    token_nll = -picked.gather(1, batch.token_ids[:, None])[:, 0]
    return torch.zeros(batch.n_rows, device=logits.device).index_add(0, batch.token_rows, token_nll * batch.token_weight)


def rewrite_pairs(requests: Sequence[EditRequest], rewrites: str) -> tuple[list[str], list[str]]:
    """(prompt, target) of each request's rewrites: the first only (``main``) or all of them."""
    prompts, targets = [], []
    for request in requests:
        for rewrite in request.rewrites if rewrites == "all" else request.rewrites[:1]:
            prompts.append(rewrite.template.replace("{}", request.subject, 1))
            targets.append(rewrite.target)
    return prompts, targets


def fine_tune(loaded: LoadedModel, names: list[str], batch: TargetBatch, config: FtConfig,
              on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train the named parameters in place on ``batch`` (L-inf clamp around their values at entry)."""
    params = parameters(loaded.model, names)
    start = {name: p.detach().clone() for name, p in params.items()}
    flags = {name: p.requires_grad for name, p in params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    losses: list[float] = []
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            for step in range(config.num_steps):
                optimizer.zero_grad(set_to_none=True)
                logits = loaded.model(**batch.inputs()).logits  # [batch pos vocab]
                loss = target_nll_rows(logits, batch).mean()
                losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(step, losses[-1])
                if losses[-1] < config.early_stop_loss:
                    break
                loss.backward()
                optimizer.step()
                if config.norm_constraint is not None:
                    with torch.no_grad():
                        eps = config.norm_constraint
                        for name, p in params.items():
                            p.copy_(torch.clamp(p, start[name] - eps, start[name] + eps))
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
            p.grad = None
    return losses


class Ft(Editor):
    """Constrained fine-tuning of the MLP output projections of ``config.layers``."""

    name = "ft"
    config: FtConfig

    def edited_names(self, loaded: LoadedModel) -> list[str]:
        """The projections' weights, and their biases with ``train_bias`` (where they have one)."""
        model, adapter = loaded.model, loaded.adapter
        by_id = {id(p): n for n, p in model.named_parameters()}
        names = [by_id[id(adapter.mlp_out_weight(model, layer))] for layer in sorted(self.config.layers)]
        if self.config.train_bias:
            biases = [adapter.module(model, "mlp_out", layer).bias for layer in sorted(self.config.layers)]
            names += [by_id[id(bias)] for bias in biases if bias is not None]
        return names

    def compute(self, loaded: LoadedModel, requests: list[EditRequest]) -> tuple[WeightDeltas, list[dict[str, Any]]]:
        model = loaded.model
        names = self.edited_names(loaded)
        before = {name: p.detach().clone() for name, p in parameters(model, names).items()}
        prompts, targets = rewrite_pairs(requests, self.config.rewrites)
        batch = target_batch(loaded, prompts, targets, prompt_last=self.config.target_positions == "prompt_last")
        losses = fine_tune(loaded, names, batch, self.config)
        after = parameters(model, names)
        deltas = WeightDeltas({name: (after[name].detach() - before[name]) for name in names})
        info = {"steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1],
                "max_abs_change": max(float(d.abs().max()) for d in deltas.deltas.values()), "update_norms": deltas.norms()}
        log.debug("ft: %d steps, loss %.3f -> %.3f", len(losses), losses[0], losses[-1])
        return deltas, [{"case_id": r.case_id, "request": r.describe(), **info} for r in requests]
