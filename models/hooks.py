"""The one hook mechanism for tracing and editing.

``Hooks(model, adapter, {hook_name: fn})`` is a context manager over canonical hook names
(``hook_embed``, ``blocks.{l}.hook_resid_post``, ``blocks.{l}.hook_attn_out``,
``blocks.{l}.hook_mlp_out``, ``blocks.{l}.mlp.hook_post``, ...). Each ``fn(tensor, name)`` may
read the activation or return a replacement; tuples (attention outputs) are unpacked and repacked
here so callers only ever see ``[batch pos d]`` tensors. Hooks are removed on exit, always, and
only the hooks this context added (nesting is safe). ``stop_after=name`` ends the forward pass
after that activation (cheap partial forwards for statistics), and the context swallows it.

``blocks.{l}.attn.hook_mask`` is the attention mask the attention module receives, shown to hook
fns in one form whatever the attention implementation: a bool ``[batch|1 head|1 query key]``
tensor, True where a query may attend to a key. transformers hands eager attention an additive
float mask and sdpa either a mask or ``None`` (causal by flag); ``None`` is materialised as the
causal mask (after any cached prefix), and a replacement goes back in the form the module reads:
bool stays bool, additive stays additive (kept values where still allowed, the dtype's minimum
where blocked), ``None`` becomes additive. Blocked keys then get exactly zero attention weight.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from core.errors import ModelError
from models.adapters import ArchitectureAdapter

HookFn = Callable[[Tensor, str], Tensor | None]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; swallowed by ``Hooks``."""


class Hooks:
    """Scoped forward hooks addressed by canonical names."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ArchitectureAdapter,
        fns: Mapping[str, HookFn | list[HookFn]],
        stop_after: str | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.fns = {name: (fn if isinstance(fn, list) else [fn]) for name, fn in fns.items()}
        self.stop_after = stop_after
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        if stop_after is not None and stop_after not in self.fns:
            self.fns[stop_after] = []

    def __enter__(self) -> "Hooks":
        try:
            for name, fns in self.fns.items():
                point = self.adapter.hook_point(name)
                module = self.adapter.get_module(self.model, point.module_path)
                stop = name == self.stop_after
                if point.where == "output":
                    self._handles.append(module.register_forward_hook(_output_hook(name, fns, stop)))
                elif point.argument == "attention_mask":
                    self._handles.append(
                        module.register_forward_pre_hook(_mask_hook(name, fns, stop), with_kwargs=True)
                    )
                else:
                    self._handles.append(
                        module.register_forward_pre_hook(_input_hook(name, fns, stop), with_kwargs=True)
                    )
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove()
        return exc_type is not None and issubclass(exc_type, StopForward)

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _apply(fns: list[HookFn], tensor: Tensor, name: str) -> Tensor | None:
    replaced = None
    for fn in fns:
        result = fn(tensor if replaced is None else replaced, name)
        if result is not None:
            replaced = result
    return replaced


def _output_hook(name: str, fns: list[HookFn], stop: bool):
    def hook(module: nn.Module, args, output):
        tensor = output[0] if isinstance(output, tuple) else output
        replaced = _apply(fns, tensor, name)
        if stop:
            raise StopForward(name)
        if replaced is None:
            return None
        return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

    return hook


def _input_hook(name: str, fns: list[HookFn], stop: bool):
    def hook(module: nn.Module, args, kwargs):
        key = None
        if args:
            tensor = args[0]
        else:
            key = next((k for k in ("hidden_states", "input", "x") if k in kwargs), next(iter(kwargs)))
            tensor = kwargs[key]
        replaced = _apply(fns, tensor, name)
        if stop:
            raise StopForward(name)
        if replaced is None:
            return None
        if key is None:
            return (replaced, *args[1:]), kwargs
        return args, {**kwargs, key: replaced}

    return hook


def _mask_hook(name: str, fns: list[HookFn], stop: bool):
    def hook(module: nn.Module, args, kwargs):
        if "attention_mask" not in kwargs and len(args) > 1:
            raise ModelError("hook", name, "the attention module got positional arguments, so its mask is not known",
                             hint="the adapter's attention module must receive attention_mask by keyword")
        original = kwargs.get("attention_mask")
        hidden = args[0] if args else kwargs["hidden_states"]
        allowed = _allowed(original, hidden, module, kwargs)
        replaced = _apply(fns, allowed, name)
        if stop:
            raise StopForward(name)
        if replaced is None:
            return None
        return args, {**kwargs, "attention_mask": _as_mask(replaced, original, hidden.dtype)}

    return hook


def _allowed(mask: Tensor | None, hidden: Tensor, module: nn.Module, kwargs) -> Tensor:  # [batch|1 head|1 query key]
    """The bool view of an attention mask; ``None`` is the causal mask after the cache's prefix."""
    if mask is None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prefix = cache.get_seq_length(getattr(module, "layer_idx", 0)) if cache is not None else 0
        queries = torch.arange(hidden.shape[1], device=hidden.device) + prefix
        keys = torch.arange(prefix + hidden.shape[1], device=hidden.device)
        return (keys[None, :] <= queries[:, None])[None, None]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _as_mask(allowed: Tensor, original: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``allowed`` back in the form the module received (see the module docstring)."""
    if original is not None and original.dtype == torch.bool:
        return allowed
    if original is None:
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    kept = original.masked_fill(~_allowed(original, original, None, {}), 0.0)  # values of newly allowed keys: 0
    return torch.where(allowed, kept, torch.finfo(original.dtype).min)


def recorder(store: dict[str, Tensor], detach: bool = True, clone: bool = True) -> HookFn:
    """A hook fn that saves each activation into ``store`` under its name (detached clone by default)."""

    def record(tensor: Tensor, name: str) -> None:
        value = tensor
        if detach:
            value = value.detach()
        if clone:
            value = value.clone()
        store[name] = value
        return None

    return record


def run_with_cache(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    names: list[str],
    stop_after: str | None = None,
    **inputs,
) -> tuple[object, dict[str, Tensor]]:
    """Run ``model(**inputs)`` and return ``(output, {name: activation})`` (detached clones)."""
    store: dict[str, Tensor] = {}
    fn = recorder(store)
    output = None
    with Hooks(model, adapter, {name: fn for name in names}, stop_after=stop_after):
        output = model(**inputs)
    return output, store
