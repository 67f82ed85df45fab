"""The adapter contract.

Nothing outside ``models/`` sees ``transformer.h.17`` or ``model.layers.5``: tracing and editing
address activations by canonical TransformerLens-style names and ask the adapter for the module,
the hook side (input or output) and the weight layout of the projections that the locate-then-edit
editors rewrite: the MLP output projection (ROME, MEMIT, AlphaEdit) and the attention output
projection (``rome_attn``).

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
``blocks.{l}.mlp.hook_pre``    output of the MLP's first linear (``mlp_in``:   [batch pos d_mlp]
                               GPT-2 c_fc / GPT-J fc_in before the activation;
                               Llama up_proj, which scales hook_post linearly)
``blocks.{l}.attn.hook_z``     heads' outputs, concatenated = input of the     [batch pos d_attn]
                               attention output projection (c_proj / out_proj
                               / o_proj)
``blocks.{l}.mlp.hook_out``    output of the out proj (the rewritten weight)   [batch pos d_model]
``blocks.{l}.attn.hook_out``   output of the attention out proj (rewritten by  [batch pos d_model]
                               rome_attn)
``hook_final_norm``            output of the final layer norm                  [batch pos d_model]
``blocks.{l}.attn.hook_mask``  which keys each query may attend to (bool,      [batch|1 head|1
                               True = allowed; see ``models.hooks``)           query key]
=============================  ==============================================  ==================

``hook_names`` lists the activations; ``blocks.{l}.attn.hook_mask`` is the one mask point (the
``attention_mask`` keyword the attention module receives), used to block attention edges.

``hook_mlp_out`` is what the MLP adds to the residual stream (tracing restores it); ``mlp.hook_out``
is what the rewritten weight W_out produces (ROME's v* and MEND's output gradient live there, so
W_out k = v can be solved). They are one tensor in GPT-2, GPT-J and Llama; in Gemma 3 a post-norm
sits between them (``models/adapters/gemma3.py``). Likewise ``hook_attn_out`` and
``attn.hook_out`` (the attention output projection's own output).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal

from torch import Tensor, nn

from core.errors import ModelError

WeightLayout = Literal["linear", "conv1d"]

_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out|mlp\.hook_post|mlp\.hook_pre"
                         r"|mlp\.hook_out|attn\.hook_z|attn\.hook_out|attn\.hook_mask)$")

# A rewritable projection ("mlp_out", "attn_out") -> (its input hook = the key, its own output = the value).
PROJECTIONS: dict[str, tuple[str, str]] = {
    "mlp_out": ("blocks.{layer}.mlp.hook_post", "blocks.{layer}.mlp.hook_out"),
    "attn_out": ("blocks.{layer}.attn.hook_z", "blocks.{layer}.attn.hook_out"),
}


@dataclass(frozen=True)
class HookPoint:
    """A module and the side hooked; ``argument`` names the keyword input hooked instead of the first input."""

    module_path: str
    where: Literal["input", "output"]
    argument: str | None = None


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
    mlp_in: str  # the MLP's first linear (knowledge-neurons patches its output)
    mlp_out: str
    final_norm: str
    unembed: str
    mlp_out_layout: WeightLayout
    attn_out: str  # the attention output projection; its input is ``attn.hook_z``
    attn_out_layout: WeightLayout
    d_attn: int  # heads x head_dim (the width of ``attn.hook_z``)
    attn_core: str | None = None  # the attention module proper, which receives attention_mask (None: ``attn``)

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
            "mlp.hook_pre": HookPoint(self.mlp_in.format(layer=layer), "output"),
            "attn.hook_mask": HookPoint((self.attn_core or self.attn).format(layer=layer), "input", argument="attention_mask"),
            "attn.hook_z": HookPoint(self.attn_out.format(layer=layer), "input"),
            "mlp.hook_out": HookPoint(self.mlp_out.format(layer=layer), "output"),
            "attn.hook_out": HookPoint(self.attn_out.format(layer=layer), "output"),
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
                f"blocks.{layer}.mlp.hook_pre",
                f"blocks.{layer}.attn.hook_z",
                f"blocks.{layer}.mlp.hook_out",
                f"blocks.{layer}.attn.hook_out",
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

    def projection_weight(self, model: nn.Module, projection: str, layer: int) -> nn.Parameter:
        """The weight of a rewritable projection (``mlp_out`` or ``attn_out``), in its stored layout."""
        self.check_layer(layer)
        return self.get_module(model, getattr(self, _projection(projection)).format(layer=layer)).weight

    def layout(self, projection: str) -> WeightLayout:
        return getattr(self, f"{_projection(projection)}_layout")

    def to_stored_layout(self, delta_out_in: Tensor, projection: str = "mlp_out") -> Tensor:
        """Convert an ``[out in]`` update (``[d_model d_mlp]`` for ``mlp_out``) into the stored weight layout.

        GPT-2's ``Conv1D`` stores ``[in out]``; linear layers store ``[out in]``. The layout is
        declared per family and projection, never guessed from the shape (square weights, such as
        every attention output projection, would be ambiguous).
        """
        return delta_out_in.T if self.layout(projection) == "conv1d" else delta_out_in

    def projection_matrix(self, model: nn.Module, projection: str, layer: int) -> Tensor:
        """The projection as an ``[out in]`` matrix (a view, no copy)."""
        weight = self.projection_weight(model, projection, layer)
        return weight.T if self.layout(projection) == "conv1d" else weight

    def mlp_out_weight(self, model: nn.Module, layer: int) -> nn.Parameter:
        """The rewritten weight, in its stored layout (see ``mlp_out_layout``)."""
        return self.projection_weight(model, "mlp_out", layer)

    def mlp_out_matrix(self, model: nn.Module, layer: int) -> Tensor:
        """The out projection as a ``[d_model d_mlp]`` matrix (a view, no copy)."""
        return self.projection_matrix(model, "mlp_out", layer)

    def embedding_matrix(self, model: nn.Module) -> Tensor:
        return self.get_module(model, self.embed).weight

    def unembedding_matrix(self, model: nn.Module) -> Tensor:  # [vocab d_model]
        return self.get_module(model, self.unembed).weight


def _projection(projection: str) -> str:
    if projection not in PROJECTIONS:
        raise ModelError("projection", projection, "not a rewritable projection", hint=f"use one of {', '.join(PROJECTIONS)}")
    return projection


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
