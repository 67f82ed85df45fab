"""A fixed held-out WikiText slice, tokenized once per tokenizer, for the general-ability NLL.

The slice is the first ``n_tokens`` tokens of the WikiText-2 test split (raw file, cleaned into
paragraphs by ``facts.sources.wikitext_paragraphs`` and joined by newlines): the same text for
every edit, so a post - pre NLL difference is the edit's doing. No edit request is drawn from
WikiText; second-moment statistics (``editors.stats``) may read the same paragraphs, but they
only estimate key covariances and never see a target.

Tokenization is cached as a ``CacheEntry`` keyed by the tokenizer's identity (model identity and
tokenizer class/vocab size) and the slice spec, so a sweep tokenizes it once per model.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
import torch
from torch import Tensor

from core.errors import DataError
from core.hashing import CacheEntry
from core.io import atomic_save_tensors
from facts.config import HeldoutSlice
from facts.sources import data_file, wikitext, wikitext_paragraphs
from models.load import LoadedModel

FORMAT_VERSION = "1"
TOKENS_FILE = "tokens.safetensors"


def _tokenize(loaded: LoadedModel, spec: HeldoutSlice, data_dir: str | Path | None) -> Tensor:  # [pos]
    paragraphs = wikitext_paragraphs(wikitext(spec.file, data_dir=data_dir))
    # Grow the prefix until it holds enough tokens: tokenizing the whole file would be ~100x more work.
    count = 16
    while True:
        text = "\n".join(paragraphs[:count])
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= spec.n_tokens or count >= len(paragraphs):
            break
        count *= 2
    if len(ids) < spec.n_tokens:
        raise DataError("stage.quality.nll_tokens", spec.n_tokens, f"{spec.file} has only {len(ids)} tokens",
                        f"use at most {len(ids)}")
    return torch.tensor(ids[: spec.n_tokens], dtype=torch.long)


def cache_key(loaded: LoadedModel, spec: HeldoutSlice) -> dict:
    tokenizer = loaded.tokenizer
    return {"version": FORMAT_VERSION, "model": loaded.identity, "tokenizer": type(tokenizer).__name__,
            "vocab_size": len(tokenizer), "sha256": data_file(f"wikitext/{spec.file}").sha256, **asdict(spec)}


def heldout_tokens(loaded: LoadedModel, spec: HeldoutSlice, cache_dir: str | Path | None = None,
                   data_dir: str | Path | None = None) -> Tensor:
    """The slice's token ids ``[pos]`` (int64), from the cache when present."""
    spec.validate()
    if cache_dir is None:
        return _tokenize(loaded, spec, data_dir)
    entry = CacheEntry(cache_dir, "heldout_tokens", cache_key(loaded, spec))

    def compute(entry: CacheEntry) -> Tensor:
        tokens = _tokenize(loaded, spec, data_dir)
        atomic_save_tensors(entry.path(TOKENS_FILE), {"tokens": tokens})
        return tokens

    def read(entry: CacheEntry) -> Tensor:
        tokens = entry.read_tensors(TOKENS_FILE)["tokens"]
        if tokens.shape != (spec.n_tokens,):
            raise ValueError(f"expected {spec.n_tokens} tokens, found shape {tuple(tokens.shape)}")
        return tokens

    return entry.load_or_compute(read, compute)

