"""One fact's trace: probabilities, the [tokens x layers] tables, and how to save, load and plot them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from core.errors import CacheError, DataError
from core.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from tracing.settings import FORMAT_VERSION, KNOCKOUT_SOURCES, TraceSettings, knockout_key

KNOCKOUT_PREFIX = knockout_key("")
from tracing.spans import Span, contiguous_spans, token_roles


@dataclass
class TraceResult:
    """Restored p(answer) per (token, layer) for each score name (``hidden``, ``mlp``, ``attn``,
    ``hidden_severed_mlp``, ``hidden_severed_attn``), plus everything needed to read them.

    ``corrupted`` are token positions; ``char_spans`` the char spans they came from. A knockout adds
    ``knockout_<source>`` rows ([1 layer]: relative drop in p(answer) on the clean run, NaN for a
    source without tokens) and ``sources`` (the positions of each source set); a trace of the
    knockout alone runs no corrupted run, so its ``p_corrupted`` is NaN.
    """

    prompt: str
    tokens: list[str]
    token_ids: list[int]
    corrupted: list[int]
    char_spans: list[Span]
    perspective: str
    answer: str
    answer_id: int
    p_clean: float
    p_corrupted: float
    scores: dict[str, Tensor]
    settings: TraceSettings
    subject: Optional[str] = None
    case_id: Optional[int] = None
    model: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    sources: dict[str, list[int]] = field(default_factory=dict)
    # True when read back from the trace cache (computed earlier, by this or another job).
    from_cache: bool = False

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_layers(self) -> int:
        return int(next(iter(self.scores.values())).shape[1])

    @property
    def spans(self) -> list[Span]:
        """Corrupted token positions as half-open token spans (several for relation templates)."""
        return contiguous_spans(self.corrupted)

    def aie(self, name: str = "hidden") -> Tensor:  # [pos layer]
        """Indirect effect of each restoration: restored p minus corrupted p."""
        return self.scores[name] - self.p_corrupted

    @property
    def table_names(self) -> list[str]:
        """Score names of the [pos layer] restoration tables (not the knockout rows)."""
        return [name for name in self.scores if not name.startswith(KNOCKOUT_PREFIX)]

    def knockout(self) -> Tensor:  # [source layer]
        """Relative drops in p(answer) per source set (``KNOCKOUT_SOURCES`` order) and layer window."""
        names = [knockout_key(source) for source in KNOCKOUT_SOURCES]
        if not all(name in self.scores for name in names):
            raise DataError("trace.kinds", sorted(self.scores), "this trace has no knockout",
                            hint="trace with kinds including knockout")
        return torch.cat([self.scores[name] for name in names])

    def roles(self) -> dict[str, list[int]]:
        return token_roles(self.n_tokens, self.corrupted)

    # -- persistence ---------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION, "prompt": self.prompt, "tokens": self.tokens, "token_ids": self.token_ids,
            "corrupted": self.corrupted, "spans": self.spans, "char_spans": [list(s) for s in self.char_spans],
            "perspective": self.perspective, "answer": self.answer, "answer_id": self.answer_id,
            "p_clean": self.p_clean, "p_corrupted": self.p_corrupted, "score_names": sorted(self.scores),
            "settings": self.settings.key(), "subject": self.subject, "case_id": self.case_id, "model": self.model,
            "seconds": self.seconds, "sources": self.sources,
        }

    def save(self, directory: str | Path, stem: str = "trace") -> list[Path]:
        """Write ``<stem>.safetensors`` (the tables) and ``<stem>.json`` (the rest), atomically."""
        directory = Path(directory)
        tensors = atomic_save_tensors(directory / f"{stem}.safetensors", {k: v.float() for k, v in self.scores.items()})
        meta = atomic_write_json(directory / f"{stem}.json", self.metadata())
        return [tensors, meta]

    @classmethod
    def load(cls, directory: str | Path, stem: str = "trace") -> "TraceResult":
        directory = Path(directory)
        meta_path, tensor_path = directory / f"{stem}.json", directory / f"{stem}.safetensors"
        if not meta_path.exists() or not tensor_path.exists():
            raise CacheError("trace", str(directory / stem), "trace files missing", hint="run the trace again")
        return cls.from_files(read_json(meta_path), load_tensors(tensor_path))

    @classmethod
    def from_files(cls, meta: dict, scores: dict[str, Tensor]) -> "TraceResult":
        """A result from its ``.json`` metadata and its ``.safetensors`` tables."""
        if meta.get("format") != FORMAT_VERSION:
            raise CacheError("trace.format", meta.get("format"), f"expected format {FORMAT_VERSION}", hint="rerun with force=true")
        settings = {k: v for k, v in meta["settings"].items() if k != "format"}
        return cls(
            prompt=meta["prompt"], tokens=meta["tokens"], token_ids=meta["token_ids"], corrupted=meta["corrupted"],
            char_spans=[tuple(s) for s in meta["char_spans"]], perspective=meta["perspective"], answer=meta["answer"],
            answer_id=meta["answer_id"], p_clean=meta["p_clean"], p_corrupted=meta["p_corrupted"],
            scores=scores, settings=TraceSettings(**settings), subject=meta["subject"],
            case_id=meta["case_id"], model=meta["model"], seconds=meta.get("seconds", 0.0),
            sources=meta.get("sources", {}),
        )
