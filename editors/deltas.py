"""Weight deltas and their exact application: ``applied(model, deltas)`` restores bit-for-bit.

Adding and then subtracting a delta is not exact in floating point, so restoring copies the
original tensors back. Deltas are kept per parameter name in the parameter's stored layout
(``ArchitectureAdapter.to_stored_layout`` turns an ``[out in]`` update into it, per projection), so
applying them never guesses a layout from a shape.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from core.errors import ModelError
from models.adapters import ArchitectureAdapter


@dataclass
class WeightDeltas:
    """Additive updates ``{parameter name: delta}`` in the stored layout of each parameter."""

    deltas: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def for_mlp_out(cls, model: nn.Module, adapter: ArchitectureAdapter, updates: Mapping[int, Tensor]) -> "WeightDeltas":
        """From ``{layer: [d_model d_mlp] update}`` of the MLP output projections."""
        return cls.for_projection(model, adapter, "mlp_out", updates)

    @classmethod
    def for_projection(cls, model: nn.Module, adapter: ArchitectureAdapter, projection: str,
                       updates: Mapping[int, Tensor]) -> "WeightDeltas":
        """From ``{layer: [out in] update}`` of a rewritable projection (``mlp_out`` or ``attn_out``)."""
        names = {id(p): n for n, p in model.named_parameters()}
        deltas = {}
        for layer, update in updates.items():
            weight = adapter.projection_weight(model, projection, layer)
            stored = adapter.to_stored_layout(update, projection)
            if stored.shape != weight.shape:
                raise ModelError(f"delta[{layer}]", tuple(update.shape), f"does not fit the {projection} weight {tuple(weight.shape)}",
                                 "an update is [out in] ([d_model d_mlp] for mlp_out, [d_model d_attn] for attn_out)")
            deltas[names[id(weight)]] = stored.detach()
        return cls(deltas)

    def __add__(self, other: "WeightDeltas") -> "WeightDeltas":
        merged = dict(self.deltas)
        for name, delta in other.deltas.items():
            merged[name] = merged[name] + delta if name in merged else delta
        return WeightDeltas(merged)

    def names(self) -> list[str]:
        return sorted(self.deltas)

    def norms(self) -> dict[str, float]:
        return {name: float(delta.float().norm()) for name, delta in self.deltas.items()}


def parameters(model: nn.Module, names: list[str]) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ModelError("deltas", missing, "parameters not in the model", "deltas belong to another architecture")
    return {n: params[n] for n in names}


def snapshot(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """Exact copies of the named parameters (for a bit-for-bit restore)."""
    return {n: p.detach().clone() for n, p in parameters(model, names).items()}


@torch.no_grad()
def restore(model: nn.Module, originals: Mapping[str, Tensor]) -> None:
    for name, param in parameters(model, list(originals)).items():
        param.copy_(originals[name])


@torch.no_grad()
def add_in_place(model: nn.Module, deltas: WeightDeltas) -> None:
    for name, param in parameters(model, deltas.names()).items():
        param.add_(deltas.deltas[name].to(device=param.device, dtype=param.dtype))


@contextlib.contextmanager
def applied(model: nn.Module, deltas: WeightDeltas) -> Iterator[nn.Module]:
    """Add ``deltas`` to the weights inside the block; restore them bit-for-bit on exit, always."""
    originals = snapshot(model, deltas.names())
    try:
        add_in_place(model, deltas)
        yield model
    finally:
        restore(model, originals)
