"""Run decoder blocks directly: from a residual state at block l to the logits, on a suffix of positions.

Causal tracing restores one (token, layer) state at a time. Everything below the restored layer
and every position before the restored token is identical to the corrupted run, so a restored run
can start at block l from a cached residual state, compute only positions >= t while attending to
the cached keys/values of positions < t (a ``PrefixCache``), and read logits at the last position
only. ``BlockStack`` hides the per-family calling convention (GPT-2 learned positions, GPT-J and
Llama rotary embeddings, Gemma 3's alternating sliding-window and global layers with their own
rotary bases) behind one interface; the modules are the model's own, so hooks placed
with ``models.hooks.Hooks`` fire as in a normal forward pass.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from core.checks import check_choice
from core.errors import ModelError
from models.adapters import ArchitectureAdapter

SUPPORTED_ATTENTION = ("eager", "sdpa")


def has_sliding_window(model) -> bool:
    """Whether some attention layer sees only a window of recent keys (Gemma 3, Qwen with sliding windows).

    Their KV-cache layers drop old keys and count the tokens they have seen, so code that selects,
    copies or extends a shared prefix cache by hand must check this.
    """
    return "sliding_attention" in (getattr(model.config, "layer_types", None) or ())


class PrefixCache:
    """A minimal stand-in for a transformers ``Cache`` handed to attention modules.

    ``update`` prepends fixed prefix keys/values of a layer (``[batch heads prefix head_dim]``)
    to the block's own, and records the block's own keys/values when ``record`` is set; it never
    grows, so one object can serve many forward calls.
    """

    def __init__(self, prefix: dict[int, tuple[Tensor, Tensor]] | None = None, record: bool = False) -> None:
        self.prefix = prefix or {}
        self.record = record
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.record:
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        if layer_idx not in self.prefix:
            return key_states, value_states
        prefix_keys, prefix_values = self.prefix[layer_idx]
        return torch.cat([prefix_keys, key_states], dim=2), torch.cat([prefix_values, value_states], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if layer_idx not in self.prefix else self.prefix[layer_idx][0].shape[2]


def cache_state(cache: Any) -> list[dict[str, Any]]:
    """A snapshot of a transformers ``Cache``'s layers (tensors by reference) for ``restore_cache_state``.

    The whole layer state, not only keys and values: a sliding-window layer (Gemma 3) also counts the
    tokens it has seen (``cumulative_length``), and a forward that is undone must undo that count too.
    """
    return [dict(vars(layer)) for layer in cache.layers]


def restore_cache_state(cache: Any, state: list[dict[str, Any]]) -> None:
    """Put a cache back as ``cache_state`` found it (e.g. back to a prompt's prefix after a forward)."""
    for layer, saved in zip(cache.layers, state):
        vars(layer).clear()
        vars(layer).update(saved)


class BlockStack:
    """The model's decoder blocks as callable steps (embed -> blocks l..L-1 -> final norm + unembed)."""

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter) -> None:
        self.model = model
        self.adapter = adapter
        implementation = getattr(model.config, "_attn_implementation", "eager") or "eager"
        check_choice("model.attn_implementation", implementation, SUPPORTED_ATTENTION,
                     "block-level runs need an explicit attention mask", error=ModelError)
        self.base = adapter.get_module(model, adapter.embed.rsplit(".", 1)[0])
        self.embed = adapter.module(model, "embed")
        self.blocks = [adapter.module(model, "block", layer) for layer in range(adapter.n_layers)]
        self.final_norm = adapter.module(model, "final_norm")
        self.unembed = adapter.get_module(model, adapter.unembed)
        # Gemma 3 (and Qwen2/3 with sliding windows) name each layer's attention type; the rest are all global.
        self.layer_types = list(getattr(model.config, "layer_types", None) or ["full_attention"] * adapter.n_layers)
        self.sliding_window = getattr(model.config, "sliding_window", None)

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    # -- inputs ------------------------------------------------------------------
    def token_embeddings(self, input_ids: Tensor) -> Tensor:  # input_ids: [batch pos] -> [batch pos d_model]
        """The ``hook_embed`` activation (token embeddings before any position embedding)."""
        return self.embed(input_ids)

    def block_input(self, token_embeds: Tensor, positions: Tensor) -> Tensor:  # [batch pos d_model]
        """Residual stream entering block 0: adds learned position embeddings where the family has them."""
        hidden = token_embeds
        wpe = getattr(self.base, "wpe", None)
        if wpe is not None:
            hidden = hidden + wpe(positions)[None].to(hidden.dtype)
        drop = getattr(self.base, "drop", None)
        return drop(hidden) if drop is not None else hidden

    def position_kwargs(self, positions: Tensor, n_prefix: int) -> dict[str, dict[str, Any]]:
        """Per attention type, the keyword arguments every block of that type shares in one run:
        mask, position ids, rotary embeddings (``run_block`` picks its layer's)."""
        position_ids = positions[None]  # [1 pos]
        rotary = getattr(self.base, "rotary_emb", None)
        by_type = {}
        for layer_type in dict.fromkeys(self.layer_types):
            window = self.sliding_window if layer_type == "sliding_attention" else None
            kwargs: dict[str, Any] = {"attention_mask": self.causal_mask(n_prefix, positions.shape[0], window),
                                      "position_ids": position_ids}
            if rotary is not None:
                probe = torch.zeros(1, positions.shape[0], 1, dtype=self.dtype, device=self.device)
                typed = "layer_type" in inspect.signature(rotary.forward).parameters
                kwargs["position_embeddings"] = rotary(probe, position_ids, layer_type) if typed else rotary(probe, position_ids)
            by_type[layer_type] = kwargs
        return by_type

    def causal_mask(self, n_prefix: int, n_query: int, window: int | None = None) -> Tensor:  # [1 1 query prefix+query]
        """Additive mask: query i (absolute position q = n_prefix + i) sees keys 0..q, or only keys
        q - window < k <= q in a sliding-window layer (transformers' ``sliding_window_overlay``)."""
        keys = torch.arange(n_prefix + n_query, device=self.device)
        queries = torch.arange(n_query, device=self.device) + n_prefix
        allowed = keys[None, :] <= queries[:, None]
        if window is not None:
            allowed &= keys[None, :] > queries[:, None] - window
        mask = torch.zeros(n_query, n_prefix + n_query, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask[None, None]

    # -- blocks and logits ---------------------------------------------------------
    def run_block(self, layer: int, hidden: Tensor, kwargs: dict[str, dict[str, Any]], cache: PrefixCache | None = None) -> Tensor:
        """One decoder block on ``hidden`` ([batch pos d_model]) with shared ``position_kwargs``."""
        out = self.blocks[layer](hidden, cache=cache, use_cache=cache is not None, **kwargs[self.layer_types[layer]])
        return out[0] if isinstance(out, tuple) else out

    def run(self, hidden: Tensor, positions: Tensor, start: int = 0, stop: int | None = None,
            cache: PrefixCache | None = None) -> Tensor:
        """Blocks ``start..stop-1`` on ``hidden`` at absolute ``positions`` (prefix keys/values from ``cache``)."""
        stop = self.n_layers if stop is None else stop
        kwargs = self.position_kwargs(positions, int(positions[0]))
        for layer in range(start, stop):
            hidden = self.run_block(layer, hidden, kwargs, cache)
        return hidden

    def logits(self, resid_final: Tensor) -> Tensor:  # [batch d_model] -> [batch vocab]
        """Final norm and unembedding of the residual stream after the last block (one position)."""
        return self.unembed(self.final_norm(resid_final))
