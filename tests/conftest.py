"""Shared fixtures: tiny random models per family (session-scoped), the embedded model, compose helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# Converted checkpoints are shared with normal runs; per-test caches use tmp_path.
os.environ.setdefault("KLOC_CACHE_DIR", str(ROOT / ".cache"))
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_MODELS = ("tiny_gpt2", "tiny_gptj", "tiny_llama", "tiny_gemma3")


@pytest.fixture(scope="session")
def model_cache() -> dict:
    return {}


def _load(name: str, cache: dict):
    from models import load_model

    if name not in cache:
        cache[name] = load_model(name)
    return cache[name]


@pytest.fixture(scope="session", params=TINY_MODELS)
def tiny_model(request, model_cache):
    """Each tiny random family in turn (gpt2, gptj, llama, gemma3); weights must be restored by tests that edit."""
    return _load(request.param, model_cache)


@pytest.fixture(scope="session")
def tiny_gpt2(model_cache):
    return _load("tiny_gpt2", model_cache)


@pytest.fixture(scope="session")
def smollm2(model_cache):
    """The embedded SmolLM2-135M-Instruct (converted once into the cache)."""
    return _load("smollm2_135m", model_cache)


@pytest.fixture()
def compose_config(tmp_path):
    """Compose the primary config with overrides, outputs and caches under tmp_path."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from core.conf import CONF_DIR
    from pipeline.config import register_configs

    register_configs()

    def _compose(*overrides: str, return_hydra_config: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(
                config_name="config",
                overrides=[f"paths.output_dir={tmp_path / 'outputs'}", *overrides],
                return_hydra_config=return_hydra_config,
            )

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module's tests: heavy CPU tests share 2 cores with other jobs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
