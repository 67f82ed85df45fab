"""Stage ``train_mend``: train MEND's hypernetwork for ``cfg.model`` on CounterFact training edits.

A thin wrapper over ``editors.mend.train.train_mend``: the edited layers and the network shape
come from ``cfg.editor`` (``editor=mend``, per-model layers from ``editor_model/mend_<model>``),
the training hyperparameters from ``cfg.stage``. Training cases are CounterFact's ``train`` split
(disjoint from the ``edit`` split the edit stage evaluates), validation cases its ``val`` split.
Writes ``mend.safetensors`` + ``mend.json`` (the checkpoint and what it was trained for),
``history.jsonl`` (the loss curve) and ``validation.jsonl`` into the job dir, and the same
checkpoint into ``<cache>/mend/<hash>/`` where ``editor=mend`` finds it by model identity.
A killed job resumes from ``resume.ckpt`` in its job dir.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from core.errors import ConfigError
from core.io import atomic_write_jsonl
from editors.mend import (MendConfig, examples_from_facts, examples_from_relation_requests, save_checkpoint, save_to_cache,
                          train_mend)
from editors.mend.checkpoint import build_metadata
from pipeline.stages.common import load_configured_model
from pipeline.stages.config import TrainMendStageConfig

log = logging.getLogger(__name__)


def _examples(kind: str, split: str, limit: Optional[int], cfg: DictConfig):
    from facts import DatasetConfig, build_relation_requests, load_facts, load_relation_table

    data_dir = Path(cfg.paths.data_dir) if cfg.paths.data_dir else None
    facts = list(load_facts(DatasetConfig(name="counterfact", split=split, limit=limit), data_dir=data_dir,
                            cache_dir=cfg.paths.cache_dir))
    examples = examples_from_facts(facts) if kind in ("entity", "both") else []
    if kind in ("relation", "both"):
        requests = build_relation_requests(facts, load_relation_table(), cache_dir=cfg.paths.cache_dir).requests
        examples += examples_from_relation_requests(requests)
    return examples


def mend_editor(cfg: DictConfig) -> MendConfig:
    """``cfg.editor`` when it is mend; with editor=none, ``editor=mend`` composed for the job's model."""
    if cfg.editor.name == "none":
        from pipeline.api import editor_config

        editor = editor_config("mend", model=cfg.model.name)
    else:
        editor = OmegaConf.to_object(cfg.editor)
    if editor.name != "mend" or not editor.layers:
        raise ConfigError("editor", editor.name, "train_mend trains the layers of the mend editor",
                          "use editor=mend (or none) and set editor.layers or conf/editor_model/mend_<model>.yaml")
    return editor


def run(cfg: DictConfig, job_dir: Path, logger) -> dict:
    settings: TrainMendStageConfig = OmegaConf.to_object(cfg.stage)
    settings.validate()
    editor = mend_editor(cfg)
    started = time.time()
    loaded = load_configured_model(cfg)
    editor.validate(loaded.adapter.n_layers)
    train = _examples(settings.examples, "train", settings.train_limit, cfg)
    val = _examples(settings.examples, "val", settings.n_val, cfg)[: settings.n_val]
    log.info("train_mend: %d training and %d validation edits, layers %s", len(train), len(val), editor.layers)
    training = {k: v for k, v in asdict(settings).items() if k not in ("name", "progress", "log_every", "checkpoint_every", "val_every")}

    def on_log(row: dict) -> None:
        logger.log_scalars({f"train_mend/{key}": value for key, value in row.items()})

    result = train_mend(loaded, train, val, editor.layers, editor.network, settings, job_dir, precision=settings.precision,
                        progress=settings.progress, on_log=on_log)
    final = result.validation[-1] if result.validation else {}
    summary = {"model": loaded.identity.get("name"), "layers": result.network.layers, "steps": result.steps,
               "resumed_from": result.resumed_from, "train_edits": len(train), "val_edits": len(val),
               "train_seconds": round(result.seconds, 1), "seconds_per_step": round(result.seconds / max(1, result.steps - result.resumed_from), 4),
               "first": result.history[0] if result.history else None, "last": result.history[-1] if result.history else None,
               "validation": final}
    metadata = build_metadata(loaded, result.network, editor.network, training, summary)
    save_checkpoint(job_dir, result.network, metadata)
    cached = save_to_cache(cfg.paths.cache_dir, result.network, metadata)
    atomic_write_jsonl(job_dir / "history.jsonl", result.history)
    atomic_write_jsonl(job_dir / "validation.jsonl", result.validation)
    logger.log_artifact("mend", [job_dir / "mend.safetensors", job_dir / "mend.json"], "model")
    log.info("train_mend: %d steps in %.0f s; checkpoint in %s and %s", result.steps, result.seconds, job_dir, cached)
    return {**summary, "checkpoint": str(job_dir), "cache_entry": str(cached), "seconds": round(time.time() - started, 1),
            "files": ["mend.safetensors", "mend.json", "history.jsonl", "validation.jsonl"]}
