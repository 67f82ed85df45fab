"""One small, real entry of every cache kind on a tiny model, and ways to damage it.

Shared by the bad-input cases (a damaged entry is a named ``CacheError``) and the repair tests
(under ``repairing(True)`` it is recomputed, equal to the original). Each ``CacheKind.fill``
computes or reads its entry in ``<base>/cache`` and returns something comparable.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

TEXTS = ["The cat sat on the mat.", "Paris is the capital of France and a large city.", "One two three four five six seven."]


def cache_of(base: Path) -> Path:
    return base / "cache"


@functools.lru_cache(maxsize=1)
def tiny_gpt2():
    """The tiny GPT-2 (loaded once; nothing here edits it), its tokenizer from KLOC_CACHE_DIR."""
    from models import load_model

    return load_model("tiny_gpt2")


def _knowledge(loaded, base: Path) -> Any:
    from facts import DatasetConfig, load_facts
    from facts.knowledge import knowledge_table

    facts = load_facts(DatasetConfig(name="known", limit=3)).facts
    return knowledge_table(loaded, facts, cache_of(base), batch_size=4)[0]


def _trace(loaded, base: Path) -> Any:
    from tracing import TraceSettings, trace

    settings = TraceSettings(kinds=("hidden",), severed=(), samples=2, window=2)
    result = trace(loaded, "The capital of Italy is", "Italy", settings=settings, noise_std=0.2, cache_dir=cache_of(base))
    meta = {k: v for k, v in result.metadata().items() if k not in ("seconds", "from_cache")}
    return meta, {name: scores.tolist() for name, scores in result.scores.items()}


def _embedding_std(loaded, base: Path) -> Any:
    from tracing.noise import embedding_std

    return embedding_std(loaded, ["Italy", "Danielle Darrieux"], cache_of(base))


def _second_moments(loaded, base: Path) -> Any:
    from editors.config import StatsConfig
    from editors.stats import second_moments

    (base / "corpus.txt").write_text("\n".join(TEXTS))
    config = StatsConfig(corpus="files", path=str(base / "corpus.txt"), n_samples=3, max_tokens=16)
    return second_moments(loaded, [1], config, cache_dir=cache_of(base))[1].tolist()


def _context_templates(loaded, base: Path) -> Any:
    from editors.templates import context_templates

    return context_templates(loaded, [[3, 2]], cache_dir=cache_of(base))


def _relation_requests(loaded, base: Path) -> Any:
    from facts import DatasetConfig, load_facts, load_relation_table
    from facts.perspectives import build_relation_requests

    facts = load_facts(DatasetConfig(name="counterfact", limit=3)).facts
    built = build_relation_requests(facts, load_relation_table(), cache_dir=cache_of(base))
    return [request.to_dict() for request in built.requests]


def _heldout_tokens(loaded, base: Path) -> Any:
    from facts.config import HeldoutSlice
    from facts.heldout import heldout_tokens

    return heldout_tokens(loaded, HeldoutSlice(n_tokens=64), cache_dir=cache_of(base)).tolist()


def _mend(loaded, base: Path) -> Any:
    from editors.mend.checkpoint import build_metadata, find_checkpoint, layer_shapes, load_checkpoint, save_to_cache
    from editors.config import NetworkConfig
    from editors.mend.network import MendNetwork

    if not (cache_of(base) / "mend").exists():
        torch.manual_seed(0)
        network = MendNetwork(layer_shapes(loaded, [1]), NetworkConfig(rank=4))
        save_to_cache(cache_of(base), network, build_metadata(loaded, network, NetworkConfig(rank=4), {"steps": 0}, {}))
    network, _ = load_checkpoint(find_checkpoint(cache_of(base), loaded.identity, [1]), loaded, [1])
    return {name: value.tolist() for name, value in network.state_dict().items()}


def _models(loaded, base: Path) -> Any:
    """The converted embedded checkpoint: copied from the shared cache on first use (json files and
    tokenizer; the weights as a hard link, or a copy across file systems), then loaded from there."""
    from models.load import embedded_tokenizer

    target = cache_of(base) / "models"
    if not target.exists():
        shared = Path(os.environ["KLOC_CACHE_DIR"]) / "models"
        for source in shared.iterdir():
            if source.is_dir() and not source.name.endswith(".partial"):
                shutil.copytree(source, target / source.name, copy_function=_link_or_copy)
            elif source.name.endswith(".lock"):
                continue
            else:
                shutil.copy2(source, target / source.name)
    return embedded_tokenizer(cache_of(base)).get_vocab()


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@dataclass(frozen=True)
class CacheKind:
    kind: str
    fill: Callable[[Any, Path], Any]
    damaged: str  # glob, under the kind's dir, of the file to damage
    slow_repair: bool = False  # recomputing converts the GGUF again (~20 s)


KINDS = [
    CacheKind("knowledge", _knowledge, "*/knowledge.jsonl"),
    CacheKind("traces", _trace, "*/trace.safetensors"),
    CacheKind("traces", _trace, "*/trace.json"),
    CacheKind("traces", _trace, "*/key.json"),
    CacheKind("embedding_std", _embedding_std, "*/std.json"),
    CacheKind("second_moments", _second_moments, "*/mom2.safetensors"),
    CacheKind("context_templates", _context_templates, "*/templates.json"),
    CacheKind("relation_requests", _relation_requests, "*/requests.json"),
    CacheKind("heldout_tokens", _heldout_tokens, "*/tokens.safetensors"),
    CacheKind("mend", _mend, "*/mend.safetensors"),
    CacheKind("mend", _mend, "*/mend.json"),
    CacheKind("models", _models, "*/model.safetensors", slow_repair=True),
    CacheKind("models", _models, "*/converted.json", slow_repair=True),
]


def case_id(kind: CacheKind) -> str:
    return f"{kind.kind}/{kind.damaged.split('/')[-1]}"


def truncate(path: Path) -> None:
    """Cut a file short (a killed copy, a full disk): half of it, at most 64 KiB kept; hard links
    are broken first, so a linked shared file stays whole."""
    with open(path, "rb") as handle:
        data = handle.read(min(path.stat().st_size // 2, 1 << 16))
    path.unlink()
    path.write_bytes(data)


def damage(kind: CacheKind, base: Path) -> Path:
    """Truncate the kind's file in its (single) entry; returns the damaged path."""
    (path,) = sorted((cache_of(base) / kind.kind).glob(kind.damaged))
    truncate(path)
    return path


def fill_and_damage(kind: CacheKind, loaded, base: Path) -> tuple[Any, Path]:
    """Fill one entry, damage it; returns (the original value, the damaged path)."""
    original = kind.fill(loaded, base)
    return original, damage(kind, base)
