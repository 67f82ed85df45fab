"""What a trace computes: kinds, window, severing, noise and samples (everything that changes a result).

Kinds ``hidden`` / ``mlp`` / ``attn`` restore states of a corrupted run (ROME); ``knockout``
blocks attention edges of the clean run (Geva et al. 2023): from the last position to one source
set (``KNOCKOUT_SOURCES``) over the window of layers centred on each layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from core.checks import check_choice
from core.errors import ConfigError

RESTORED = ("hidden", "mlp", "attn")
KINDS = RESTORED + ("knockout",)
# Source sets whose attention edges from the last position a knockout blocks (tracing.spans.knockout_sources).
KNOCKOUT_SOURCES = ("subject", "relation", "last")
SEVERABLE = ("mlp", "attn")
NOISE_DISTRIBUTIONS = ("gaussian", "uniform")
PERSPECTIVES = ("entity", "relation")
FORMAT_VERSION = 1


def severed_key(sublayer: str) -> str:
    """Score name of hidden-state restoration with ``sublayer`` outputs of later layers frozen."""
    return f"hidden_severed_{sublayer}"


def knockout_key(source: str) -> str:
    """Score name of the relative drop in p(answer) when the last position cannot attend to ``source``."""
    return f"knockout_{source}"


@dataclass(frozen=True)
class TraceSettings:
    """Settings of one trace.

    ``noise_scale`` is absolute (the std of Gaussian noise, or the half-width of uniform noise);
    ``None`` means ``noise_factor`` x the std of subject-token embeddings (ROME's ``s3``), which
    the caller resolves with ``tracing.noise.embedding_std``. ``severed`` lists the sublayers
    whose later-layer outputs stay frozen at their corrupted values in extra hidden-state traces.
    """

    kinds: tuple[str, ...] = RESTORED
    severed: tuple[str, ...] = ()
    window: int = 10
    samples: int = 10
    noise: str = "gaussian"
    noise_scale: Optional[float] = None
    noise_factor: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "severed", tuple(self.severed))
        for kind in self.kinds:
            if kind not in KINDS:
                raise ConfigError("trace.kinds", kind, "unknown kind", hint=f"use any of {', '.join(KINDS)}")
        for sublayer in self.severed:
            if sublayer not in SEVERABLE:
                raise ConfigError("trace.severed", sublayer, "unknown sublayer to sever", hint=f"use any of {', '.join(SEVERABLE)}")
        if not self.kinds and not self.severed:
            raise ConfigError("trace.kinds", self.kinds, "nothing to trace", hint="give at least one kind")
        if self.window < 1:
            raise ConfigError("trace.window", self.window, "must be >= 1", hint="ROME uses 10")
        if self.samples < 1:
            raise ConfigError("trace.samples", self.samples, "must be >= 1", hint="ROME uses 10")
        check_choice("trace.noise", self.noise, NOISE_DISTRIBUTIONS, "unknown noise distribution")
        if self.noise_scale is not None and self.noise_scale < 0:
            raise ConfigError("trace.noise_scale", self.noise_scale, "must be >= 0 or null", hint="null means noise_factor x embedding std")

    @property
    def restored(self) -> tuple[str, ...]:
        """The restoration kinds (hidden / mlp / attn) among ``kinds``."""
        return tuple(kind for kind in self.kinds if kind in RESTORED)

    @property
    def table_names(self) -> tuple[str, ...]:
        """Score names of the [pos layer] restoration tables."""
        return self.restored + tuple(severed_key(s) for s in self.severed)

    @property
    def knockout_names(self) -> tuple[str, ...]:
        """Score names of the knockout rows ([1 layer] each), empty unless ``knockout`` is a kind."""
        return tuple(knockout_key(s) for s in KNOCKOUT_SOURCES) if "knockout" in self.kinds else ()

    @property
    def score_names(self) -> tuple[str, ...]:
        return self.table_names + self.knockout_names

    def with_scale(self, scale: float) -> "TraceSettings":
        return TraceSettings(**{**asdict(self), "noise_scale": float(scale)})

    def key(self) -> dict[str, Any]:
        """Cache-key view (the resolved noise scale is part of it)."""
        return {**asdict(self), "kinds": list(self.kinds), "severed": list(self.severed), "format": FORMAT_VERSION}


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """ROME's window of layers centred on ``layer``: max(0, l - w//2) .. min(L, l - (-w//2)) (half-open)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))

