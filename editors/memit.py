"""MEMIT (Meng et al., 2023): many edits spread over a range of MLP layers by least squares.

z_i (the residual stream after the last edited layer L at request i's lookup token) is optimised
like ROME's v* (``values``, at ``blocks.{L}.hook_resid_post``). Then for each layer l in order,
with the keys K [request d_mlp] recomputed on the partly edited model and R = Z - Z_now the
remaining residual at L, the update takes an equal share of R::

    Delta_l = argmin  lambda * tr(Delta C Delta^T) + ||Delta K^T - R^T / (layers left)||^2
            = (R / left)^T K (lambda C + K^T K)^-1          (float64; lambda = mom2_update_weight)

The key of a request at layer l is its key prompt's MLP key averaged as the authors' compute_ks
does: per group of context templates (``"{}"``, then each ``(length, count)`` run), then over the
groups -- so the bare prompt weighs 1/2 with MEMIT's ``[[10, 5]]`` (the paper writes a flat mean).

Requests sharing a subject share their key (it is computed once); their targets then compete in
the least squares, and a warning says so when their targets differ.

Relation edits with ``relation_removal=authors`` also take RaKE's removal contexts: their
compute_z_rel slices MEMIT's nested templates (``context_templates[:5]``), i.e. five *groups*,
which is every template when there are at most five groups (ROME's flat list gives five templates).
tests/test_memit_fixtures.py checks all of this against kmeng01/memit and RaKE's baselines/memit.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Sequence

import torch
from einops import einsum
from torch import Tensor
from tqdm.auto import tqdm

from editors.base import Editor
from editors.config import MemitConfig
from editors.deltas import WeightDeltas, add_in_place
from editors.keys import activations_at, encode_prompt, request_keys
from editors.requests import EditRequest
from editors.stats import second_moments
from editors.templates import template_groups
from editors.values import optimize_values
from models.load import LoadedModel

log = logging.getLogger(__name__)


def least_squares_update(keys: Tensor, residual: Tensor, moment: Tensor, weight: float) -> Tensor:
    """``[d_model d_mlp]`` = R^T K (weight * C + K^T K)^-1 in float64.

    keys: [request d_mlp]; residual: [request d_model]; moment: [d_mlp d_mlp].
    """
    keys, residual = keys.double(), residual.double()
    system = weight * moment.double() + keys.T @ keys  # [d_mlp d_mlp], symmetric positive definite
    adjusted = torch.linalg.solve(system, keys.T)  # [d_mlp request]
    return einsum(residual, adjusted, "request d_model, d_mlp request -> d_model d_mlp")


def unique_keys(requests: list[EditRequest]) -> tuple[list[EditRequest], list[int]]:
    """Requests with distinct key prompts, and for each request the index of its representative."""
    seen: dict[tuple, int] = {}
    representatives: list[EditRequest] = []
    index = []
    for request in requests:
        key = (request.subject, request.key_template, request.lookup)
        if key not in seen:
            seen[key] = len(representatives)
            representatives.append(request)
        elif representatives[seen[key]].rewrites != request.rewrites:
            log.warning("requests %s and %s share the key of %r but want different targets: the least squares "
                        "averages them", representatives[seen[key]].case_id, request.case_id, request.subject)
        index.append(seen[key])
    return representatives, index


def authors_removal_contexts(requests: Sequence[EditRequest], groups: Sequence[int]) -> list[EditRequest]:
    """Removal rewrites read ``n_contexts`` as a number of context groups (RaKE's compute_z_rel slice)."""
    def widen(rewrite):
        if not rewrite.removal or rewrite.n_contexts is None:
            return rewrite
        return replace(rewrite, n_contexts=sum(groups[:rewrite.n_contexts]))

    return [replace(request, rewrites=tuple(widen(rewrite) for rewrite in request.rewrites)) for request in requests]


class Memit(Editor):
    name = "memit"
    config: MemitConfig
    default_edit_batch_size = 100

    def moments(self, loaded: LoadedModel, layers: list[int]) -> dict[int, Tensor]:
        """E[k k^T] of each layer's keys (float64, per-token mean; cached on disk under ``cache_dir``)."""
        return second_moments(loaded, layers, self.config.stats, self.cache_dir, self.data_dir)

    def layer_update(self, loaded: LoadedModel, layer: int, keys: Tensor, residual: Tensor, moment: Tensor) -> Tensor:
        """One layer's ``[d_model d_mlp]`` Delta from its keys [request d_mlp] and residual share
        [request d_model] (MEMIT: the least squares against C; AlphaEdit overrides it)."""
        return least_squares_update(keys, residual, moment, self.config.mom2_update_weight)

    def compute(self, loaded: LoadedModel, requests: list[EditRequest]) -> tuple[WeightDeltas, list[dict[str, Any]]]:
        config = self.config
        layers = sorted(config.layers)
        last = layers[-1]
        z_hook = f"blocks.{last}.hook_resid_post"
        contexts = self.contexts(loaded)
        groups = template_groups(config.context_template_lengths)
        moments = self.moments(loaded, layers)
        z_requests = authors_removal_contexts(requests, groups) if config.relation_removal == "authors" else requests
        batches = [z_requests[i:i + config.value_batch_size] for i in range(0, len(requests), config.value_batch_size)]
        values = [v for batch in tqdm(batches, desc=f"{self.name} z", disable=len(batches) < 2)
                  for v in optimize_values(loaded, batch, contexts, z_hook, config.value_settings())]
        targets = torch.stack([v.target for v in values])  # [request d_model]
        bare = [encode_prompt(loaded.tokenizer, "{}", r.rewrites[0].template, r.subject, r.lookup) for r in requests]
        representatives, index = unique_keys(requests)
        total = WeightDeltas()
        norms = {}
        for position, layer in enumerate(layers):
            keys = request_keys(loaded, representatives, contexts, [layer], groups=groups)[layer][index]  # [request d_mlp]
            current = _read(loaded, bare, z_hook)  # [request d_model]
            residual = (targets - current) / (len(layers) - position)
            update = self.layer_update(loaded, layer, keys, residual, moments[layer])
            step = WeightDeltas.for_mlp_out(loaded.model, loaded.adapter, {layer: update.float()})
            add_in_place(loaded.model, step)  # the next layer's keys and residual see this one
            total = total + step
            norms[layer] = float(update.norm())
        infos = [{"case_id": r.case_id, "request": r.describe(), **v.info()} for r, v in zip(requests, values)]
        for info in infos:
            info["update_norms"] = norms
        return total, infos


def _read(loaded: LoadedModel, prompts, hook: str) -> Tensor:
    """Activations of ``hook`` (a ``blocks.{l}.*`` name) at each prompt's lookup token."""
    return activations_at(loaded, prompts, [hook], stop_after=hook)[hook]
