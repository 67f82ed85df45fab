"""Noise for the corrupted runs: its scale (ROME's ``collect_embedding_std``) and the seeded samples.

The noise for a fact depends only on (seed, prompt, corrupted positions), so the corrupted run
and every restored run of a trace share it, on any device.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from core.errors import DataError
from core.hashing import CacheEntry, content_hash
from core.io import atomic_write_json
from models.load import LoadedModel

log = logging.getLogger(__name__)

STD_VERSION = 1


@torch.no_grad()
def embedding_std(loaded: LoadedModel, subjects: Sequence[str], cache_dir: str | Path | None = None) -> float:
    """Std of all token-embedding entries of the given subjects (each tokenized on its own, as ROME).

    Measured on the embedding module's output (``hook_embed``), the tensor the noise is added to and
    block 0 sees: the weight rows for GPT-2, GPT-J and Llama, sqrt(d_model) times them for Gemma 3,
    whose embedding module scales inside.

    Cached per (model, subjects) when ``cache_dir`` is given.
    """
    subjects = sorted(set(subjects))
    if not subjects:
        raise DataError("subjects", subjects, "no subjects to measure the embedding std on",
                        hint="pass the dataset's subjects or an explicit noise_scale")
    key = {"version": STD_VERSION, "model": loaded.identity, "subjects": content_hash(subjects), "n": len(subjects)}
    if cache_dir is None:
        return _subject_std(loaded, subjects)
    entry = CacheEntry(cache_dir, "embedding_std", key)

    def compute(entry: CacheEntry) -> float:
        std = _subject_std(loaded, subjects)
        atomic_write_json(entry.path("std.json"), {"std": std, "n_subjects": len(subjects)})
        return std

    return entry.load_or_compute(lambda e: float(e.read("std.json")["std"]), compute)


def _subject_std(loaded: LoadedModel, subjects: Sequence[str]) -> float:
    embed = loaded.adapter.module(loaded.model, "embed")
    ids = [i for subject in subjects for i in loaded.tokenizer(subject, add_special_tokens=False)["input_ids"]]
    rows = embed(torch.tensor(ids, device=loaded.device)).double()  # [token d_model]
    std = float(rows.std())
    log.info("embedding std over %d subjects (%d tokens): %.5f", len(subjects), len(ids), std)
    return std

def noise_seed(seed: int, prompt: str, positions: Sequence[int]) -> int:
    """A 63-bit seed from (seed, fact): the same fact always gets the same noise."""
    return int(content_hash({"seed": seed, "prompt": prompt, "positions": list(positions)}), 16) % (2**63 - 1)


def make_noise(samples: int, n_positions: int, d_model: int, scale: float, distribution: str, seed: int) -> Tensor:
    """Noise ``[sample pos d_model]`` in float32 on the CPU (moved to the model's device by the caller)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (samples, n_positions, d_model)
    if distribution == "uniform":
        base = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1
    else:
        base = torch.randn(shape, generator=generator, dtype=torch.float64)
    return (base * scale).float()
