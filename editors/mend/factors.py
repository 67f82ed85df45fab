"""The inputs and the differentiable application of a MEND edit.

``gradient_factors`` runs the unedited model on teacher-forced (prompt, target) rows and returns,
per edited layer, the out projection's input u (``blocks.{l}.mlp.hook_post``) and the gradient of
the target NLL (averaged over all target tokens of the batch, as the authors' ``masked_log_probs``)
at its output delta (``blocks.{l}.mlp.hook_out``, the projection's own output: before Gemma 3's
post-norm, the MLP's output elsewhere) for every real token. ``edited_forward`` runs the model with
W_l + Delta W_l substituted (``torch.func.functional_call``), so a training loss backpropagates
into the hypernetwork, and the same deltas added in place give the same logits at edit time.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor
from torch.func import functional_call

from editors.ft import TargetBatch, target_nll_rows
from models.hooks import Hooks
from models.load import LoadedModel


def projection_names(loaded: LoadedModel, layers: list[int]) -> dict[int, str]:
    """``{layer: parameter name}`` of the MLP output projections."""
    by_id = {id(p): n for n, p in loaded.model.named_parameters()}
    return {layer: by_id[id(loaded.adapter.mlp_out_weight(loaded.model, layer))] for layer in layers}


def token_mean_nll(logits: Tensor, batch: TargetBatch) -> Tensor:
    """NLL averaged over every target token of the batch (rows weighted by their target length).

    MEND's loss (the authors' ``masked_log_probs``): with several rows, a longer target weighs
    more than in ``target_nll_rows(...).mean()``; with one row the two are the same."""
    lengths = torch.tensor([len(t) for t in batch.target_ids], dtype=torch.float32, device=logits.device)
    return (target_nll_rows(logits, batch) * lengths).sum() / lengths.sum()


def gradient_factors(loaded: LoadedModel, batch: TargetBatch, layers: list[int]) -> tuple[dict[int, tuple[Tensor, Tensor]], float]:
    """``{layer: (u [token d_mlp], delta [token d_model])}`` of the mean target NLL, and that NLL."""
    inputs: dict[int, Tensor] = {}
    probes: dict[int, Tensor] = {}

    def keep_input(tensor: Tensor, name: str) -> None:
        inputs[int(name.split(".")[1])] = tensor.detach()

    def add_probe(tensor: Tensor, name: str) -> Tensor:
        probe = torch.zeros_like(tensor, requires_grad=True)  # d loss / d probe = d loss / d output
        probes[int(name.split(".")[1])] = probe
        return tensor + probe

    fns = {}
    for layer in layers:
        fns[f"blocks.{layer}.mlp.hook_post"] = keep_input
        fns[f"blocks.{layer}.mlp.hook_out"] = add_probe
    with torch.enable_grad(), Hooks(loaded.model, loaded.adapter, fns):
        logits = loaded.model(**batch.inputs()).logits  # [batch pos vocab]
        loss = token_mean_nll(logits, batch)
        grads = torch.autograd.grad(loss, [probes[layer] for layer in layers])
    real = batch.attention_mask.bool()  # [batch pos]
    factors = {}
    for layer, grad in zip(layers, grads):
        u, delta = inputs[layer][real], grad[real]  # [token d]
        keep = (u != 0).any(-1) & (delta != 0).any(-1)  # tokens after the last target position carry no gradient
        factors[layer] = (u[keep], delta[keep])
    return factors, float(loss.detach())


def edited_forward(loaded: LoadedModel, names: Mapping[int, str], updates: Mapping[int, Tensor], inputs: dict[str, Tensor]):
    """The model's output with ``W_l + updates[l]`` (``[d_model d_mlp]``) in place of each projection."""
    params = dict(loaded.model.named_parameters())
    replaced = {names[layer]: params[names[layer]] + loaded.adapter.to_stored_layout(update).to(params[names[layer]].dtype)
                for layer, update in updates.items()}
    return functional_call(loaded.model, replaced, args=(), kwargs=inputs)
