"""Causal tracing (ROME) from the entity and the relation perspective.

``trace`` / ``trace_fact`` trace one fact with one call and return a ``TraceResult`` that saves
and loads itself; ``tracing.engine`` is the batched engine, ``tracing.reference`` the
one-forward-per-restoration oracle it is tested against; ``tracing.knockout`` is the attention
knockout (kind ``knockout``, Geva et al. 2023); ``tracing.aggregate`` computes AIE by
token role with bootstrap intervals and ``tracing.plots`` draws the figures (``plot_trace`` for
one result).
"""

from importlib import import_module
from typing import Any

# name -> module, imported on first use: ``tracing.settings`` (what a trace computes, its defaults)
# stays importable without torch, so the stage schemas can take their defaults from it.
_EXPORTS = {
    "default_noise_std": "tracing.api", "perspective_char_spans": "tracing.api", "resolve_settings": "tracing.api",
    "trace": "tracing.api", "trace_fact": "tracing.api", "embedding_std": "tracing.noise", "TraceResult": "tracing.result",
    "KINDS": "tracing.settings", "KNOCKOUT_SOURCES": "tracing.settings", "SEVERABLE": "tracing.settings",
    "TraceSettings": "tracing.settings", "knockout_key": "tracing.settings", "severed_key": "tracing.settings",
    "window_layers": "tracing.settings", "ROLES": "tracing.spans", "token_roles": "tracing.spans",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tracing' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


__all__ = sorted(_EXPORTS)
