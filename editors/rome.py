"""ROME (Meng et al., 2022): a rank-one update of one MLP output projection per request.

For a request at layer l: the key k* is the MLP input at the lookup token averaged over the
context templates (``keys``); v* is optimised at the MLP output (``values``); the update solves

    min ||Delta K||_F  s.t. (W + Delta) k_c = v*,   K K^T ~ C = E[k k^T]

in closed form, Delta = (v* - W k_c) (C^-1 k*)^T / ((C^-1 k*)^T k_c). ``constraint_key="mean"``
takes k_c = k* (the paper's equation); ``"prompt"`` (the default, as the authors' code) takes k_c
= the key of the bare edit prompt, at which v* was optimised, so that prompt maps to v* exactly.
Several requests are applied one after another, each on the model edited by the previous ones.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import einsum
from torch import Tensor

from editors.base import Editor
from editors.config import RomeConfig
from editors.deltas import WeightDeltas, add_in_place
from editors.keys import encode_prompt, keys_at, request_keys
from editors.requests import EditRequest
from editors.stats import second_moments
from editors.values import optimize_values
from models.load import LoadedModel


def rank_one_update(residual: Tensor, key_star: Tensor, key_constraint: Tensor, inverse_moment: Tensor | None) -> Tensor:
    """``[d_model d_mlp]`` Delta with Delta k_c = residual and direction C^-1 k* (float64 inside).

    residual: [d_model] = v* - (W k_c + b); key_star, key_constraint: [d_mlp]; inverse_moment: [d_mlp d_mlp] or None.
    """
    key_star, key_constraint = key_star.double(), key_constraint.double()
    u = inverse_moment.double() @ key_star if inverse_moment is not None else key_star  # [d_mlp]
    u = u / u.norm()
    return einsum(residual.double() / (u @ key_constraint), u, "d_model, d_mlp -> d_model d_mlp")


class Rome(Editor):
    name = "rome"
    config: RomeConfig

    def __init__(self, config: RomeConfig, cache_dir=None, data_dir=None) -> None:
        super().__init__(config, cache_dir, data_dir)
        self._inverse: dict[tuple[str, int], Tensor] = {}

    def inverse_moment(self, loaded: LoadedModel, layer: int) -> Tensor | None:
        """C^-1 of the layer (float64), computed once per editor and model."""
        if not self.config.mom2_adjustment:
            return None
        key = (repr(sorted(loaded.identity.items())), layer)
        if key not in self._inverse:
            moment = second_moments(loaded, [layer], self.config.stats, self.cache_dir, self.data_dir)[layer]
            self._inverse[key] = torch.linalg.inv(moment.double())
        return self._inverse[key]

    def compute(self, loaded: LoadedModel, requests: list[EditRequest]) -> tuple[WeightDeltas, list[dict[str, Any]]]:
        contexts = self.contexts(loaded)
        model, adapter = loaded.model, loaded.adapter
        total = WeightDeltas()
        infos = []
        for request in requests:
            info: dict[str, Any] = {"case_id": request.case_id, "request": request.describe()}
            for layer in sorted(self.config.layers):
                key_star = request_keys(loaded, [request], contexts, [layer])[layer][0]  # [d_mlp]
                value = optimize_values(loaded, [request], contexts, f"blocks.{layer}.mlp.hook_out", self.config.value_settings())[0]
                if self.config.constraint_key == "prompt":
                    bare = encode_prompt(loaded.tokenizer, "{}", request.rewrites[0].template, request.subject, request.lookup)
                    key_constraint = keys_at(loaded, [bare], [layer])[layer][0]
                else:
                    key_constraint = key_star
                with torch.no_grad():
                    out_proj = adapter.module(model, "mlp_out", layer)
                    current = out_proj(key_constraint[None].to(next(out_proj.parameters()).dtype))[0].float()  # [d_model]
                update = rank_one_update(value.target - current, key_star, key_constraint, self.inverse_moment(loaded, layer))
                step = WeightDeltas.for_mlp_out(model, adapter, {layer: update.float()})
                add_in_place(model, step)  # later layers and requests see this edit
                total = total + step
                info[f"layer_{layer}"] = {**value.info(), "update_norm": float(update.norm())}
            infos.append(info)
        return total, infos
