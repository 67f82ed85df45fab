"""What the evaluate, edit and full stages share: scoring settings and fact-sharded scoring.

``ScoringSettings`` holds the fields of the two-sided evaluation (batch size, bootstrap, progress
and device placement), so ``stage=evaluate`` and ``stage=edit`` validate them once, the same way.
``score_cases`` scores cases in this process, or shards them over ``fabric.devices`` ranks, each
loading its own model replica (``pipeline.distributed``): the rows are identical either way.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from core.errors import ConfigError
from models.config import ModelConfig
from models.load import LoadedModel, load_model
from pipeline.distributed import FabricConfig, map_sharded


@dataclass
class ScoringSettings:
    # (prompt, candidate) rows per forward pass (halved automatically on GPU out-of-memory).
    batch_size: int = 256
    # Cap on the extra entity-side paraphrases drawn from the relation's templates (null: all).
    max_template_paraphrases: Optional[int] = None
    n_resamples: int = 1000
    confidence: float = 0.95
    progress: bool = True
    # Shard the cases over several devices (one model replica each); devices=1 scores in-process.
    fabric: FabricConfig = field(default_factory=FabricConfig)

    def validate(self, prefix: str = "stage") -> None:
        for key in ("batch_size", "n_resamples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key}", getattr(self, key), "must be >= 1")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"{prefix}.confidence", self.confidence, "must be in (0, 1)", hint="e.g. 0.95")
        if self.max_template_paraphrases is not None and self.max_template_paraphrases < 0:
            raise ConfigError(f"{prefix}.max_template_paraphrases", self.max_template_paraphrases, "must be >= 0",
                              hint="use null for all templates")
        self.fabric.validate()


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
