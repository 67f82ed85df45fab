"""Typed schemas of the config groups, their ConfigStore registration, and custom resolvers.

Each group option yaml starts with ``defaults: [<group>_schema, _self_]`` (Hydra's structured
config pattern), so a misspelled key or a wrong type fails at compose time, not mid-sweep.
Modules own their schemas; this file only registers them.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from core.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

PERSPECTIVES = ("entity", "relation")
RELATION_SPANS = ("template", "phrase")


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    output_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class PerspectiveConfig:
    name: str = MISSING
    # Relation perspective: which prompt tokens count as "the relation" (see facts.perspectives).
    relation_span: str = "template"


@dataclass
class LoggerConfig:
    name: str = MISSING
    mode: str = "offline"
    project: str = "knowledge-localization"
    entity: Optional[str] = None


@dataclass
class EditorConfig:
    """Base of every editor schema; ``none`` means no edit."""

    name: str = MISSING


# (group, schema name, "module:Class"): modules own their schemas, imported lazily here.
SCHEMAS: list[tuple[str, str, str]] = [
    ("paths", "paths_schema", "pipeline.config:PathsConfig"),
    ("model", "model_schema", "models.config:ModelConfig"),
    ("dataset", "dataset_schema", "facts.config:DatasetConfig"),
    ("perspective", "perspective_schema", "pipeline.config:PerspectiveConfig"),
    ("logger", "logger_schema", "pipeline.config:LoggerConfig"),
    ("editor", "editor_schema", "pipeline.config:EditorConfig"),
    ("editor", "rome_schema", "editors.rome:RomeConfig"),
    ("editor", "memit_schema", "editors.memit:MemitConfig"),
    ("editor", "ft_schema", "editors.ft:FtConfig"),
    ("editor", "kn_schema", "editors.kn:KnConfig"),
    ("editor", "mend_schema", "editors.mend.editor:MendConfig"),
    ("stage", "train_mend_schema", "pipeline.stages.train_mend:TrainMendStageConfig"),
    ("stage", "edit_schema", "pipeline.stages.edit:EditStageConfig"),
    ("stage", "summarize_schema", "pipeline.stages.summarize:SummarizeStageConfig"),
    ("stage", "known_schema", "pipeline.stages.known:KnownStageConfig"),
    ("stage", "trace_schema", "pipeline.stages.trace:TraceStageConfig"),
    ("stage", "evaluate_schema", "pipeline.stages.evaluate:EvaluateStageConfig"),
    ("stage", "full_schema", "pipeline.stages.full:FullStageConfig"),
]


def _load(spec: str) -> type:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


MAX_DIRNAME = 200  # file systems cap a name at 255 bytes


def dirname_from_overrides(override_dirname: str) -> str:
    """A job dir name from Hydra's override dirname: filesystem-safe, never empty, at most
    ``MAX_DIRNAME`` characters (a long one keeps its start and ends with a hash of the whole)."""
    if not override_dirname:
        return "defaults"
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", override_dirname)
    if len(name) <= MAX_DIRNAME:
        return name
    digest = hashlib.sha256(override_dirname.encode()).hexdigest()[:16]
    return f"{name[: MAX_DIRNAME - 18]}+{digest}"


def register_configs() -> None:
    """Register schemas and resolvers (idempotent; called by the entry point and by tests)."""
    store = ConfigStore.instance()
    for group, name, spec in SCHEMAS:
        store.store(group=group, name=name, node=_load(spec))
    if not OmegaConf.has_resolver("kloc.cwd"):
        OmegaConf.register_new_resolver("kloc.cwd", lambda: os.getcwd())
    if not OmegaConf.has_resolver("kloc.dirname"):
        OmegaConf.register_new_resolver("kloc.dirname", dirname_from_overrides)


def available_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def model_config_by_name(name: str):
    """Compose ``conf/model/<name>.yaml`` outside Hydra (notebooks, scripts)."""
    from models.config import ModelConfig

    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError("model", name, "unknown model config", hint=f"available: {', '.join(available_options('model'))}")
    values = OmegaConf.load(path)
    values.pop("defaults", None)
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), values)
    return OmegaConf.to_object(merged)


def check_choice(key: str, value: str, choices: tuple[str, ...] | list[str]) -> str:
    if value not in choices:
        raise ConfigError(key, value, "not a valid choice", hint=f"use one of {', '.join(choices)}")
    return value
