"""Causal tracing (ROME) from the entity and the relation perspective.

``trace`` / ``trace_fact`` trace one fact with one call and return a ``TraceResult`` that saves
and loads itself; ``tracing.engine`` is the batched engine, ``tracing.reference`` the
one-forward-per-restoration oracle it is tested against; ``tracing.knockout`` is the attention
knockout (kind ``knockout``, Geva et al. 2023); ``tracing.aggregate`` computes AIE by
token role with bootstrap intervals and ``tracing.plots`` draws the figures (``plot_trace`` for
one result).
"""

from tracing.api import default_noise_std, perspective_char_spans, resolve_settings, trace, trace_fact
from tracing.noise import embedding_std
from tracing.result import TraceResult
from tracing.settings import KINDS, KNOCKOUT_SOURCES, SEVERABLE, TraceSettings, knockout_key, severed_key, window_layers
from tracing.spans import ROLES, token_roles

__all__ = [
    "KINDS", "KNOCKOUT_SOURCES", "ROLES", "SEVERABLE", "TraceResult", "TraceSettings", "default_noise_std",
    "embedding_std", "knockout_key", "perspective_char_spans", "resolve_settings", "severed_key", "token_roles", "trace",
    "trace_fact", "window_layers",
]
