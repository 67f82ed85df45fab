"""Test helpers shared by several test files (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from editors import EditRequest

TEMPLATES = ["The capital of {} is", "The mother tongue of {} is", "{} is located in", "{} works as a",
             "{} was born in", "The headquarters of {} are in", "{} plays the", "{} speaks"]


def write_known_user_facts(loaded, path: Path, n: int = 2) -> list[dict]:
    """User facts whose object is the tiny model's own greedy next word, so the model 'knows' them."""
    rows = []
    for i, template in enumerate(TEMPLATES):
        prompt = template.format("Italy")
        ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            word = loaded.tokenizer.decode([int(loaded.model(input_ids=ids).logits[0, -1].argmax())])
        if word.startswith(" ") and word.strip().isalpha():
            rows.append({"case_id": i, "subject": "Italy", "relation_id": None, "template": template, "object": word.strip()})
    assert len(rows) >= n, "the tiny model predicts too few word tokens for this test"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return rows[:n]


def bias_only(boosts: dict[int, float]):
    """A fresh tiny Llama whose logits are a fixed bias at every position (context-independent), so
    every prompt's scores follow from a hand formula. Returns the model and a copy of the bias."""
    from models import load_model

    loaded = load_model("tiny_llama")
    head = nn.Linear(loaded.adapter.d_model, loaded.adapter.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for token, value in boosts.items():
            head.bias[token] = value
    head.requires_grad_(False)
    loaded.model.lm_head = head
    return loaded, head.bias.detach().clone()


def race_identical_jobs(out_dir: str, trials: int) -> list[list[str]]:
    """Start the same job twice at once (two forked processes), ``trials`` times; returns each trial's
    two outcomes: ``computed``, ``skipped`` (found the results), ``waited+...`` (met the other's lock)
    or ``crashed: ...``. Run it in a fresh process: forking a process whose torch threads already
    ran can deadlock."""
    import logging
    import os

    from hydra import compose, initialize_config_dir

    from core.conf import CONF_DIR
    from pipeline.config import register_configs
    from pipeline.jobs import run_job

    register_configs()
    outcomes = []
    for trial in range(trials):
        base = Path(out_dir) / f"trial{trial}"
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[
                "stage=known", "model=tiny_gpt2", "dataset=known", "dataset.limit=50", "logger=none",
                f"paths.output_dir={base}", f"paths.cache_dir={Path(out_dir) / 'cache'}"])
        children = []
        for child in range(2):
            pid = os.fork()
            if pid == 0:
                records: list[str] = []
                handler = logging.Handler()
                handler.emit = lambda record: records.append(record.getMessage())
                logging.getLogger().addHandler(handler)
                logging.getLogger().setLevel(logging.INFO)
                try:
                    run_job(cfg, base / "job")
                    text = "\n".join(records)
                    outcome = ("waited+" if "waiting for it" in text else "") + ("skipped" if "skipping" in text else "computed")
                except BaseException as err:  # noqa: BLE001 - reported to the parent
                    outcome = f"crashed: {type(err).__name__}: {err}"
                (base / f"outcome{child}").write_text(outcome)
                os._exit(0)
            children.append(pid)
        for pid in children:
            os.waitpid(pid, 0)
        outcomes.append([(base / f"outcome{child}").read_text() for child in range(2)])
    return outcomes


# -- editing tests on tiny random models (test_alphaedit, test_rome_variants) ----------------------
def subject_last(target: str, subject: str = "Danielle Darrieux", case_id: int = 0) -> EditRequest:
    """A prompt that ends with the subject: where a tiny random model's edit is direct (see test_editors)."""
    from editors import EditRequest, Rewrite

    return EditRequest(case_id, subject, (Rewrite("Mother tongue: {}", target),), "Mother tongue: {}")


def top_token(loaded, prompt: str) -> str:
    ids = loaded.tokenizer(prompt, return_tensors="pt").to(loaded.device)
    with torch.no_grad():
        return loaded.tokenizer.decode(loaded.model(**ids).logits[0, -1].argmax()).strip()


def weights(loaded) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in loaded.model.named_parameters()}


def changed(before: dict, loaded) -> set[str]:
    return {name for name, p in loaded.model.named_parameters() if not torch.equal(before[name], p)}


def parameter_name(loaded, projection: str, layer: int) -> str:
    weight = loaded.adapter.projection_weight(loaded.model, projection, layer)
    return next(name for name, p in loaded.model.named_parameters() if p is weight)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def shared_model_cache(root: Path) -> Path:
    """``root/cache``: a per-test cache whose ``models`` entry links to the session's ($KLOC_CACHE_DIR), so
    a test gets fresh caches for everything but the converted models and tokenizers (~10 s each)."""
    import os

    cache = root / "cache"
    if not cache.exists():
        shared = Path(os.environ["KLOC_CACHE_DIR"]).resolve() / "models"
        shared.mkdir(parents=True, exist_ok=True)
        cache.mkdir(parents=True)
        (cache / "models").symlink_to(shared)
    return cache

