"""The adapter contract.

Nothing outside ``models/`` sees ``transformer.h.17`` or ``model.layers.5``: tracing and editing
address activations by canonical TransformerLens-style names and ask the adapter for the module,
the hook side (input or output) and the weight layout of the MLP output projection that ROME and
MEMIT rewrite.

Canonical hook names (``l`` is a 0-based layer):

=============================  ==============================================  ==================
name                           activation                                      shape
=============================  ==============================================  ==================
``hook_embed``                 token embeddings (before position embeddings)   [batch pos d_model]
``blocks.{l}.hook_resid_pre``  residual stream entering block l                [batch pos d_model]
``blocks.{l}.hook_resid_post`` residual stream leaving block l                 [batch pos d_model]
``blocks.{l}.hook_attn_out``   attention output (added to the residual)        [batch pos d_model]
``blocks.{l}.hook_mlp_out``    MLP output (added to the residual)              [batch pos d_model]
``blocks.{l}.mlp.hook_post``   MLP hidden activation = input of the out proj   [batch pos d_mlp]
``blocks.{l}.mlp.hook_out``    output of the out proj (the rewritten weight)   [batch pos d_model]
``hook_final_norm``            output of the final layer norm                  [batch pos d_model]
=============================  ==============================================  ==================

``hook_mlp_out`` is what the MLP adds to the residual stream (tracing restores it); ``mlp.hook_out``
is what the rewritten weight W_out produces (ROME's v* and MEND's output gradient live there, so
W_out k = v can be solved). They are one tensor in GPT-2, GPT-J and Llama; in Gemma 3 a post-norm
sits between them (``models/adapters/gemma3.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal

from torch import Tensor, nn

from core.errors import ModelError

WeightLayout = Literal["linear", "conv1d"]

_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out|mlp\.hook_post|mlp\.hook_out)$")


@dataclass(frozen=True)
class HookPoint:
    module_path: str
    where: Literal["input", "output"]


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module paths of one family (``{layer}`` is filled in) and its sizes."""

    family: str
    n_layers: int
    d_model: int
    d_mlp: int
    vocab_size: int
    embed: str
    block: str
    attn: str
    mlp: str
    mlp_out: str
    final_norm: str
    unembed: str
    mlp_out_layout: WeightLayout

    # -- names -----------------------------------------------------------------
    def hook_point(self, name: str) -> HookPoint:
        if name == "hook_embed":
            return HookPoint(self.embed, "output")
        if name == "hook_final_norm":
            return HookPoint(self.final_norm, "output")
        match = _BLOCK_NAME.match(name)
        if match is None:
            raise ModelError("hook", name, "unknown hook name", hint=f"use one of {self.hook_names(1)[:7]} with a layer 0..{self.n_layers - 1}")
        layer, kind = int(match.group(1)), match.group(2)
        self.check_layer(layer, key="hook")
        table = {
            "hook_resid_pre": HookPoint(self.block.format(layer=layer), "input"),
            "hook_resid_post": HookPoint(self.block.format(layer=layer), "output"),
            "hook_attn_out": HookPoint(self.attn.format(layer=layer), "output"),
            "hook_mlp_out": HookPoint(self.mlp.format(layer=layer), "output"),
            "mlp.hook_post": HookPoint(self.mlp_out.format(layer=layer), "input"),
            "mlp.hook_out": HookPoint(self.mlp_out.format(layer=layer), "output"),
        }
        return table[kind]

    def hook_names(self, n_layers: int | None = None) -> list[str]:
        names = ["hook_embed"]
        for layer in range(self.n_layers if n_layers is None else n_layers):
            names += [
                f"blocks.{layer}.hook_resid_pre",
                f"blocks.{layer}.hook_attn_out",
                f"blocks.{layer}.hook_mlp_out",
                f"blocks.{layer}.hook_resid_post",
                f"blocks.{layer}.mlp.hook_post",
                f"blocks.{layer}.mlp.hook_out",
            ]
        return names + ["hook_final_norm"]

    def check_layer(self, layer: int, key: str = "layer") -> int:
        if not 0 <= layer < self.n_layers:
            raise ModelError(key, layer, f"out of range for {self.family} ({self.n_layers} layers)", hint=f"use 0-{self.n_layers - 1}")
        return layer

    # -- modules and weights ---------------------------------------------------
    @staticmethod
    def get_module(model: nn.Module, path: str) -> nn.Module:
        try:
            return model.get_submodule(path)
        except AttributeError as err:
            raise ModelError("module", path, "not found in the model", hint="the adapter does not match this checkpoint") from err

    def module(self, model: nn.Module, kind: str, layer: int | None = None) -> nn.Module:
        template = getattr(self, kind)
        return self.get_module(model, template.format(layer=layer) if layer is not None else template)

    def mlp_out_weight(self, model: nn.Module, layer: int) -> nn.Parameter:
        """The rewritten weight, in its stored layout (see ``mlp_out_layout``)."""
        self.check_layer(layer)
        return self.get_module(model, self.mlp_out.format(layer=layer)).weight

    def to_stored_layout(self, delta_out_in: Tensor) -> Tensor:
        """Convert a ``[d_model d_mlp]`` (out x in) update into the stored weight layout.

        GPT-2's ``Conv1D`` stores ``[in out]``; linear layers store ``[out in]``. The layout is
        declared per family, never guessed from the shape (square weights would be ambiguous).
        """
        return delta_out_in.T if self.mlp_out_layout == "conv1d" else delta_out_in

    def mlp_out_matrix(self, model: nn.Module, layer: int) -> Tensor:
        """The out projection as a ``[d_model d_mlp]`` matrix (a view, no copy)."""
        weight = self.mlp_out_weight(model, layer)
        return weight.T if self.mlp_out_layout == "conv1d" else weight

    def embedding_matrix(self, model: nn.Module) -> Tensor:
        return self.get_module(model, self.embed).weight

    def unembedding_matrix(self, model: nn.Module) -> Tensor:  # [vocab d_model]
        return self.get_module(model, self.unembed).weight


AdapterFactory = Callable[[object], ArchitectureAdapter]
_REGISTRY: dict[str, AdapterFactory] = {}


def register_adapter(*model_types: str) -> Callable[[AdapterFactory], AdapterFactory]:
    def decorate(factory: AdapterFactory) -> AdapterFactory:
        for model_type in model_types:
            _REGISTRY[model_type] = factory
        return factory

    return decorate


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """Pick the adapter from ``model.config.model_type``; a clear error if the family is unknown."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise ModelError(
            "model.config.model_type",
            model_type,
            "no architecture adapter for this family",
            hint=f"supported: {', '.join(supported_model_types())}; add one in models/adapters/",
        )
    return _REGISTRY[model_type](config)
