"""What the evaluate, edit and full stages share: scoring settings and fact-sharded scoring.

``ScoringSettings`` holds the fields of the two-sided evaluation (batch size, bootstrap, progress
and device placement), so ``stage=evaluate`` and ``stage=edit`` validate them once, the same way.
``score_cases`` scores cases in this process, or shards them over ``fabric.devices`` ranks, each
loading its own model replica (``pipeline.distributed``): the rows are identical either way.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from models.config import ModelConfig
from models.load import LoadedModel, load_model
from pipeline.distributed import map_sharded
from pipeline.stages.config import ScoringSettings


def score_cases(loaded: LoadedModel, model: ModelConfig, cases: Sequence, relations: Mapping[str, Any],
                settings: ScoringSettings, cache_dir: str | Path) -> list[dict[str, Any]]:
    """Both-sided evaluation rows of ``cases`` for the model as it is now (in input order)."""
    if settings.fabric.devices == 1:
        return score_in_process(loaded, list(cases), relations, settings.batch_size, settings.progress)
    task = functools.partial(_score_shard, model=model, relations=relations, cache_dir=str(cache_dir),
                             batch_size=settings.batch_size)
    return map_sharded(task, list(cases), settings.fabric)


def score_in_process(loaded: LoadedModel, cases: list, relations: Mapping[str, Any], batch_size: int,
                     progress: bool = False) -> list[dict[str, Any]]:
    """Rows for the model as it is in this process (post-edit scoring never shards: the edit is here)."""
    from metrics.evaluation import evaluate_cases, evaluation_rows

    return evaluation_rows(evaluate_cases(loaded, cases, relations, batch_size=batch_size, progress=progress))


def _score_shard(cases: list, device: torch.device, *, model: ModelConfig, relations: Mapping[str, Any], cache_dir: str,
                 batch_size: int) -> list[dict]:
    """One rank's share: a model replica on ``device`` (unedited weights: shards score baselines)."""
    loaded = load_model(replica_config(model, device), cache_dir=cache_dir)
    return score_in_process(loaded, cases, relations, batch_size)


def replica_config(model: ModelConfig, device: torch.device) -> ModelConfig:
    """The model config of one rank's replica: the rank's device, never split across devices."""
    return dataclasses.replace(model, device=str(device), device_map=None)
