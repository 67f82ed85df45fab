"""The tensors one trace needs, shared by the batched engine and the reference oracle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

from core.errors import ConfigError
from tracing.noise import make_noise, noise_seed
from tracing.settings import TraceSettings


@dataclass(frozen=True)
class TraceInputs:
    """Token ids ``[pos]``, corrupted positions, the answer token and the noise ``[sample n_corrupted d_model]``;
    ``sources``: the knockout source sets (``tracing.spans.knockout_sources``), empty without a knockout."""

    token_ids: Tensor
    positions: tuple[int, ...]
    answer_id: int | None
    noise: Tensor
    sources: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def make_inputs(token_ids: Sequence[int], positions: Sequence[int], answer_id: int | None, settings: TraceSettings,
                d_model: int, prompt: str, sources: Mapping[str, Sequence[int]] | None = None) -> TraceInputs:
    """Draw the fact's noise from (seed, prompt, positions); ``answer_id=None`` means the clean top-1 token."""
    if settings.noise_scale is None:
        raise ConfigError("trace.noise_scale", None, "the noise scale must be resolved before tracing",
                          hint="use tracing.noise.embedding_std(...) * noise_factor, or settings.with_scale(x)")
    positions = tuple(sorted(positions))
    noise = make_noise(settings.samples, len(positions), d_model, settings.noise_scale, settings.noise,
                       noise_seed(settings.seed, prompt, positions))
    return TraceInputs(torch.tensor(list(token_ids), dtype=torch.long), positions, answer_id, noise,
                       {name: tuple(p) for name, p in (sources or {}).items()})


def answer_token(tokenizer, answer: str) -> int:
    """First token of `` answer`` (targets are stored without their leading space)."""
    ids = tokenizer(" " + answer.lstrip(" "), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError("answer", answer, "tokenizes to nothing", hint="give a non-empty answer")
    return int(ids[0])


@dataclass
class TraceScores:
    """Raw outputs of a trace: p(answer) clean / corrupted, ``{name: [pos layer]}`` restored p and
    ``{knockout_<source>: [1 layer]}`` relative drops."""

    answer_id: int
    p_clean: float
    p_corrupted: float
    scores: dict[str, Tensor]
