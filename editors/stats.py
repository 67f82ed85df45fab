"""Second-moment statistics C = E[k k^T] of the keys of a rewritten projection.

The keys are the MLP input (``blocks.{l}.mlp.hook_post``) by default, or any other hook with a
``{layer}`` field (``rome_attn``: the attention output projection's input, ``blocks.{l}.attn.hook_z``).

ROME and MEMIT weigh their updates by C: ROME's key direction is C^-1 k*, MEMIT's least squares
is regularised by C. C is estimated over a text corpus (ROME: 100k Wikipedia articles) and
accumulated in float64 over every non-padding token. Corpora come from the ``datasets`` hub
(``wikipedia``, ``wikitext103``) when reachable, or from local text (``wikitext2``: the WikiText-2
files facts.sources resolves or ``path``; ``files``: any text files, one sample per line).

Each layer is a cache entry (safetensors + key.json written last) keyed by model identity, layer,
corpus, sample count, token limit and dtypes; a run computes only the layers that are missing,
in one forward pass that stops after the deepest of them, under a per-entry lock.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from core.errors import DataError
from core.hashing import CacheEntry
from core.io import atomic_save_tensors
from editors.config import StatsConfig
from editors.keys import MLP_KEY
from facts.sources import wikitext_paragraphs
from models.hooks import Hooks
from models.load import LoadedModel

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
MOMENT_FILE = "mom2.safetensors"
WIKITEXT2_FILES = ("wikitext-2-raw/wiki.test.raw", "wikitext-2/valid.txt")  # ~0.45M words, ~4k paragraphs


# ------------------------------------------------------------------------------------- corpora
def _hub_texts(corpus: str, n_samples: int) -> list[str]:
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise DataError("stats.corpus", corpus, "streaming a hub corpus needs the `datasets` package",
                        'pip install -e ".[corpora]", or use editor.stats.corpus=wikitext2 (bundled) or corpus=files') from err
    try:
        if corpus == "wikipedia":
            stream = load_dataset("wikimedia/wikipedia", "20231101.en", split="train", streaming=True)
        else:
            stream = load_dataset("Salesforce/wikitext", "wikitext-103-raw-v1", split="train", streaming=True)
        texts = []
        for row in stream:
            text = row["text"].strip()
            if text and not text.startswith("="):
                texts.append(text)
            if len(texts) >= n_samples:
                break
        return texts
    except Exception as err:  # noqa: BLE001 - any hub failure means: use a local corpus
        raise DataError("stats.corpus", corpus, f"cannot load from the hub ({type(err).__name__}: {err})",
                        "offline? use editor.stats.corpus=wikitext2 (bundled) or corpus=files with a path") from err


def corpus_texts(config: StatsConfig, data_dir: str | Path | None = None) -> list[str]:
    """Up to ``n_samples`` texts of the configured corpus (fewer if the corpus is smaller)."""
    config.validate()
    if config.corpus in ("wikitext103", "wikipedia"):
        return _hub_texts(config.corpus, config.n_samples)
    if config.corpus == "files":
        root = Path(config.path)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        if not files or not all(f.exists() for f in files):
            raise DataError("stats.path", config.path, "no text files found", "give a text file or a directory of them")
        texts = [line.strip() for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif config.path:
        texts = []
        for name in WIKITEXT2_FILES:
            file = Path(config.path) / name
            if not file.exists():
                raise DataError("stats.path", str(file), "WikiText-2 file missing", "point stats.path at the wikitext dir")
            texts += wikitext_paragraphs(file.read_text(encoding="utf-8"))
    else:
        from facts.sources import wikitext

        texts = [p for name in WIKITEXT2_FILES for p in wikitext_paragraphs(wikitext(name, data_dir=data_dir))]
    if len(texts) < config.n_samples:
        log.info("corpus %s has %d samples (< n_samples=%d): using all", config.corpus, len(texts), config.n_samples)
    return texts[: config.n_samples]


# -------------------------------------------------------------------------------- accumulation
def key_hook(layer: int, hook: str = MLP_KEY) -> str:
    return hook.format(layer=layer)


@torch.no_grad()
def accumulate_second_moments(
    loaded: LoadedModel, layers: Sequence[int], texts: Sequence[str], max_tokens: int = 1024, batch_size: int = 8,
    progress: bool = True, hook: str = MLP_KEY,
) -> tuple[dict[int, Tensor], int]:
    """``({layer: E[k k^T] [d_key d_key] float64}, token count)`` over every non-padding token."""
    layers = sorted({loaded.adapter.check_layer(layer, key="editor.layers") for layer in layers})
    names = {key_hook(layer, hook): layer for layer in layers}
    sums: dict[int, Tensor] = {}
    count = 0
    tokenizer = loaded.tokenizer
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths per batch: little padding
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mask: Tensor | None = None

    def accumulate(tensor: Tensor, name: str) -> None:
        keys = tensor[mask].to(torch.float64)  # [token d_key]
        layer = names[name]
        if layer not in sums:
            sums[layer] = torch.zeros(keys.shape[1], keys.shape[1], dtype=torch.float64, device=keys.device)
        sums[layer].addmm_(keys.T, keys)

    with _right_padding(tokenizer):
        for batch in tqdm(batches, desc="second moments", disable=not progress):
            encoded = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, truncation=True,
                                max_length=max_tokens).to(loaded.device)
            mask = encoded["attention_mask"].bool()  # [batch pos]
            with Hooks(loaded.model, loaded.adapter, {name: accumulate for name in names},
                       stop_after=key_hook(layers[-1], hook)):
                loaded.model(**encoded)
            count += int(mask.sum())
    if count == 0:
        raise DataError("stats.corpus", len(texts), "no tokens to average over", "check the corpus")
    return {layer: total / count for layer, total in sums.items()}, count


@contextlib.contextmanager
def _right_padding(tokenizer):
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        yield
    finally:
        tokenizer.padding_side = side


# ------------------------------------------------------------------------------------- caching
def cache_key(loaded: LoadedModel, layer: int, config: StatsConfig, hook: str = MLP_KEY) -> dict:
    return {"version": FORMAT_VERSION, "model": loaded.identity, "hook": key_hook(layer, hook), "corpus": config.corpus,
            "path": config.path, "n_samples": config.n_samples, "max_tokens": config.max_tokens,
            "activation_dtype": str(next(loaded.model.parameters()).dtype), "accumulation_dtype": "float64"}


def second_moments(
    loaded: LoadedModel, layers: Sequence[int], config: StatsConfig, cache_dir: str | Path | None = None,
    data_dir: str | Path | None = None, hook: str = MLP_KEY,
) -> dict[int, Tensor]:
    """``{layer: E[k k^T]}`` (float64) of ``hook``'s keys, from the cache where present; missing layers in one pass."""
    config.validate()
    layers = sorted(set(layers))
    if cache_dir is None:
        return accumulate_second_moments(loaded, layers, corpus_texts(config, data_dir), config.max_tokens, config.batch_size,
                                         hook=hook)[0]
    entries = {layer: CacheEntry(cache_dir, "second_moments", cache_key(loaded, layer, config, hook)) for layer in layers}
    moments = {layer: _read_moment(entries[layer]) for layer in layers}
    missing = [layer for layer in layers if moments[layer] is None]
    if missing:  # check, lock, check again: a complete cache is read without locks or writes
        with contextlib.ExitStack() as stack:
            for layer in missing:  # sorted order: no two processes wait on each other
                stack.enter_context(entries[layer].lock())
            moments.update({layer: _read_moment(entries[layer]) for layer in missing})
            missing = [layer for layer in missing if moments[layer] is None]
            if missing:
                log.info("second moments for layers %s of %s (%s, %d samples)", missing, loaded.identity.get("name"),
                         config.corpus, config.n_samples)
                texts = corpus_texts(config, data_dir)
                computed, count = accumulate_second_moments(loaded, missing, texts, config.max_tokens, config.batch_size,
                                                            hook=hook)
                for layer, moment in computed.items():
                    entries[layer].clear()
                    atomic_save_tensors(entries[layer].path(MOMENT_FILE), {"mom2": moment},
                                        metadata={"tokens": str(count), "samples": str(len(texts))})
                    entries[layer].mark_done()
                    moments[layer] = moment
    return {layer: moment.to(loaded.device) for layer, moment in moments.items()}


def _read_moment(entry: CacheEntry) -> Tensor | None:
    """The cached moment, or None when missing (or corrupt while repairing)."""
    # clone: the loaded tensor may be backed by the file's memory map
    found, moment = entry.try_read(lambda e: e.read_tensors(MOMENT_FILE)["mom2"].clone())
    return moment if found else None
