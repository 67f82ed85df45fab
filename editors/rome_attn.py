"""ROME at attention: ROME's rank-one update of one attention output projection per request.

The projection (GPT-2 ``attn.c_proj``, GPT-J ``attn.out_proj``, Llama ``self_attn.o_proj``) maps
the heads' concatenated outputs to the attention output, as the MLP's out projection maps its
hidden activation to the MLP output, so ROME's closed form applies unchanged with

    key k: the projection's input ``blocks.{l}.attn.hook_z`` [d_attn] at the lookup token,
           averaged over the context templates (k*) or of the bare prompt (k_c, ``constraint_key``);
    value v*: optimised at the attention projection's output ``blocks.{l}.attn.hook_out`` [d_model];
    C: the second moment of the projection's inputs over the statistics corpus.

Delta = (v* - W k_c - b) (C^-1 k*)^T / ((C^-1 k*)^T k_c) (``rome.rank_one_update``), in the
projection's stored layout (adapters declare it per family). The per-model layer is the relation
trace's attention peak (conf/editor_model/rome_attn_<model>.yaml).

``compute`` is ``Rome.compute`` with the projection's hooks named by ``Site``: at ``projection =
"mlp_out"`` it gives ROME's deltas (tests/test_rome_variants.py), so ``Rome.compute`` could become
this loop (left to rome.py's owner).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from editors.config import RomeConfig
from editors.deltas import WeightDeltas, add_in_place
from editors.keys import encode_prompt, keys_at, request_keys
from editors.requests import EditRequest
from editors.rome import Rome, rank_one_update
from editors.stats import second_moments
from editors.values import optimize_values
from models.adapters import PROJECTIONS
from models.load import LoadedModel


@dataclass(frozen=True)
class Site:
    """A rewritable projection and its canonical key (input) and value (output) hooks."""

    projection: str

    @property
    def key_hook(self) -> str:  # with a {layer} field
        return PROJECTIONS[self.projection][0]

    def value_hook(self, layer: int) -> str:
        return PROJECTIONS[self.projection][1].format(layer=layer)


class RomeAttn(Rome):
    name = "rome_attn"
    config: RomeConfig
    edited_projection = "attn_out"

    @property
    def site(self) -> Site:
        return Site(self.edited_projection)

    def inverse_moment(self, loaded: LoadedModel, layer: int) -> Tensor | None:
        """C^-1 of the projection's inputs (float64), computed once per editor and model."""
        if not self.config.mom2_adjustment:
            return None
        key = (repr(sorted(loaded.identity.items())), layer)
        if key not in self._inverse:
            moment = second_moments(loaded, [layer], self.config.stats, self.cache_dir, self.data_dir,
                                    hook=self.site.key_hook)[layer]
            self._inverse[key] = torch.linalg.inv(moment.double())
        return self._inverse[key]

    def compute(self, loaded: LoadedModel, requests: list[EditRequest]) -> tuple[WeightDeltas, list[dict[str, Any]]]:
        contexts = self.contexts(loaded)
        model, adapter, site = loaded.model, loaded.adapter, self.site
        total = WeightDeltas()
        infos = []
        for request in requests:
            info: dict[str, Any] = {"case_id": request.case_id, "request": request.describe()}
            for layer in sorted(self.config.layers):
                key_star = request_keys(loaded, [request], contexts, [layer], hook=site.key_hook)[layer][0]  # [d_key]
                value = optimize_values(loaded, [request], contexts, site.value_hook(layer), self.config.value_settings())[0]
                if self.config.constraint_key == "prompt":
                    bare = encode_prompt(loaded.tokenizer, "{}", request.rewrites[0].template, request.subject, request.lookup)
                    key_constraint = keys_at(loaded, [bare], [layer], hook=site.key_hook)[layer][0]
                else:
                    key_constraint = key_star
                with torch.no_grad():
                    out_proj = adapter.module(model, site.projection, layer)
                    current = out_proj(key_constraint[None].to(next(out_proj.parameters()).dtype))[0].float()  # [d_model]
                update = rank_one_update(value.target - current, key_star, key_constraint, self.inverse_moment(loaded, layer))
                step = WeightDeltas.for_projection(model, adapter, site.projection, {layer: update.float()})
                add_in_place(model, step)  # later layers and requests see this edit
                total = total + step
                info[f"layer_{layer}"] = {**value.info(), "update_norm": float(update.norm())}
            infos.append(info)
        return total, infos
