"""Causal tracing speed: the batched engine vs the one-forward-per-restoration reference (ROME's loop).

CPU (always): SmolLM2-135M on an 11-token known fact, hidden states only, 10 noise samples. The
engine traces the whole [token x layer] table; the reference runs a spread subset of cells
(``BENCH_TRACING_CELLS``, default 12) and is extrapolated to the full table -- every reference
restoration is one full forward of the same size, so its cost does not depend on the cell. Both
run in this process, one after the other, and must agree within 1e-5 on the sampled cells.

GPU (``--gpu``): seconds per prompt of a full trace (hidden + MLP + attention, 10 samples,
window 10, a 10-token prompt with a 3-token subject) on GPT-2 XL and GPT-J sized models built
from their configs with random weights (no download), in fp32 and bf16, plus the reference's
extrapolated seconds per prompt on the same machine.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from core.io import atomic_write_json
from models.adapters import adapter_for
from models.load import LoadedModel
from tracing.api import perspective_char_spans
from tracing.engine import engine_scores
from tracing.inputs import make_inputs
from tracing.reference import reference_scores
from tracing.settings import TraceSettings
from tracing.spans import corrupted_positions

log = logging.getLogger(__name__)

PROMPT = "Shah Alam II is affiliated with the religion of"  # 11 tokens; SmolLM2 answers " Islam"
SUBJECT = "Shah Alam II"


def spread_cells(n_tokens: int, n_layers: int, n_cells: int) -> list[tuple[int, int]]:
    """``n_cells`` (token, layer) cells spread over the table (deterministic)."""
    total = n_tokens * n_layers
    step = max(1, total // n_cells)
    return [(i // n_layers, i % n_layers) for i in range(0, total, step)][:n_cells]


def compare(loaded, token_ids: list[int], positions: list[int], settings: TraceSettings, n_cells: int,
            prompt: str) -> dict:
    """Engine seconds for the full table, reference seconds extrapolated from ``n_cells`` cells."""
    inputs = make_inputs(token_ids, positions, None, settings, loaded.adapter.d_model, prompt)
    n_layers = loaded.adapter.n_layers
    cells = spread_cells(len(token_ids), n_layers, n_cells)
    n_full = len(token_ids) * n_layers * len(settings.score_names)
    _sync(loaded)
    started = time.perf_counter()
    engine = engine_scores(loaded, inputs, settings)
    _sync(loaded)
    engine_seconds = time.perf_counter() - started
    started = time.perf_counter()
    reference = reference_scores(loaded, inputs, settings, cells=cells)
    _sync(loaded)
    reference_cells_seconds = time.perf_counter() - started
    reference_seconds = reference_cells_seconds / (len(cells) * len(settings.score_names)) * n_full
    difference = max(abs(float(engine.scores[n][t, layer]) - float(reference.scores[n][t, layer]))
                     for n in engine.scores for t, layer in cells)
    return {"engine_seconds": round(engine_seconds, 3), "reference_seconds_extrapolated": round(reference_seconds, 3),
            "reference_cells": len(cells) * len(settings.score_names), "restorations": n_full,
            "ratio": round(reference_seconds / engine_seconds, 2), "max_abs_difference_on_cells": difference,
            "n_tokens": len(token_ids), "n_layers": n_layers, "samples": settings.samples,
            "kinds": list(settings.score_names), "dtype": str(next(loaded.model.parameters()).dtype)}


def cpu_case(n_cells: int) -> dict:
    from models import load_model

    loaded = load_model("smollm2_135m")
    loaded.model.to("cpu")
    token_ids, positions = corrupted_positions(loaded.tokenizer, PROMPT, perspective_char_spans(PROMPT, SUBJECT, "entity"))
    settings = TraceSettings(kinds=("hidden",), samples=10, noise_scale=3 * 0.1167)  # 3 x SmolLM2's known-subject std
    return {"model": "smollm2_135m", "device": "cpu", "threads": torch.get_num_threads(), "prompt": PROMPT,
            **compare(loaded, token_ids, positions, settings, n_cells, PROMPT)}


def random_model(family: str, dtype: torch.dtype, device: torch.device, small: bool = False) -> LoadedModel:
    """GPT-2 XL / GPT-J shaped models with random weights, built directly on ``device``."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM

    if family == "gpt2_xl":
        config = GPT2Config(n_layer=48, n_embd=1600, n_head=25) if not small else GPT2Config(n_layer=4, n_embd=64, n_head=4)
        cls = GPT2LMHeadModel
    else:
        config = GPTJConfig() if not small else GPTJConfig(n_layer=4, n_embd=64, n_head=4, rotary_dim=8)
        cls = GPTJForCausalLM
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = cls(config).to(dtype).eval().requires_grad_(False)
    identity = {"name": f"random_{family}", "source": "random", "dtype": str(dtype)}
    return LoadedModel(model=model, tokenizer=None, adapter=adapter_for(model), config=None, identity=identity)


def gpu_cases(device: torch.device, small: bool = False, n_cells: int = 6) -> list[dict]:
    settings = TraceSettings(kinds=("hidden", "mlp", "attn"), window=10, samples=10, noise_scale=0.1)
    generator = torch.Generator().manual_seed(0)
    token_ids = torch.randint(100, 20000, (10,), generator=generator).tolist()
    positions = [1, 2, 3]
    rows = []
    for family in ("gpt2_xl", "gptj"):
        for dtype in (torch.float32, torch.bfloat16):
            loaded = random_model(family, dtype, device, small)
            engine_scores(loaded, make_inputs(token_ids[:4], [1], None, settings, loaded.adapter.d_model, "warmup"), settings)
            row = {"model": family, "device": str(device), **compare(loaded, token_ids, positions, settings, n_cells, "random")}
            row["seconds_per_prompt"] = row["engine_seconds"]
            log.info("%s %s: %.2f s per prompt (reference ~%.1f s, %.1fx)", family, dtype, row["engine_seconds"],
                     row["reference_seconds_extrapolated"], row["ratio"])
            rows.append(row)
            del loaded
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _sync(loaded) -> None:
    if next(loaded.model.parameters()).is_cuda:
        torch.cuda.synchronize()


def main(args) -> dict:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    n_cells = int(os.environ.get("BENCH_TRACING_CELLS", "12"))
    results: dict = {"cpu": cpu_case(n_cells)}
    cpu = results["cpu"]
    print(f"SmolLM2 CPU ({cpu['threads']} threads), {cpu['n_tokens']}-token prompt, hidden only, {cpu['samples']} samples:")
    print(f"  batched engine   {cpu['engine_seconds']:8.1f} s per prompt")
    print(f"  reference (ROME) {cpu['reference_seconds_extrapolated']:8.1f} s per prompt "
          f"(extrapolated from {cpu['reference_cells']} of {cpu['restorations']} restorations)")
    print(f"  ratio            {cpu['ratio']:8.1f}x   max |difference| on sampled cells {cpu['max_abs_difference_on_cells']:.1e}")
    if getattr(args, "gpu", False):
        if not torch.cuda.is_available():
            print("--gpu: no CUDA device; skipped")
        else:
            results["gpu"] = gpu_cases(torch.device("cuda"))
            for row in results["gpu"]:
                print(f"  {row['model']:8s} {row['dtype']:15s} {row['seconds_per_prompt']:7.2f} s per prompt "
                      f"(reference ~{row['reference_seconds_extrapolated']:.1f} s, {row['ratio']:.1f}x)")
    out = Path(getattr(args, "out", "outputs/bench"))
    atomic_write_json(out / "bench_tracing.json", results)
    return results
