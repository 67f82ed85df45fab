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
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from core.conf import CONF_DIR, available_options, config_groups
from core.paths import default_cache_dir
from core.errors import ConfigError


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    output_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class PerspectiveConfig:
    name: str = MISSING
    # Relation perspective: which prompt tokens count as "the relation" (see facts.perspectives):
    # template, every non-subject token of the prompt; phrase, only the relation's content words.
    relation_span: str = "template"


@dataclass
class LoggerConfig:
    name: str = MISSING
    mode: str = "offline"
    project: str = "knowledge-localization"
    entity: Optional[str] = None


@dataclass
class CacheConfig:
    # Recompute a corrupt or truncated cache entry instead of failing on it (force=true does too).
    repair: bool = MISSING


@dataclass
class RootConfig:
    """The primary config's own keys, typed so that ``force=maybe`` or ``seed=abc`` fail at compose
    time. The group nodes are typed by their own schemas; the values live in ``conf/config.yaml``."""

    paths: Any = MISSING
    model: Any = MISSING
    dataset: Any = MISSING
    perspective: Any = MISSING
    editor: Any = MISSING
    stage: Any = MISSING
    logger: Any = MISSING
    cache: CacheConfig = field(default_factory=CacheConfig)
    sweep_name: str = MISSING
    seed: int = MISSING
    force: bool = MISSING


@dataclass
class EditorConfig:
    """Base of every editor schema; ``none`` means no edit."""

    name: str = MISSING


# (group, schema name, "module:Class"): modules own their schemas, imported lazily here.
SCHEMAS: list[tuple[str | None, str, str]] = [
    (None, "config_schema", "pipeline.config:RootConfig"),
    ("paths", "paths_schema", "pipeline.config:PathsConfig"),
    ("model", "model_schema", "models.config:ModelConfig"),
    ("dataset", "dataset_schema", "facts.config:DatasetConfig"),
    ("perspective", "perspective_schema", "pipeline.config:PerspectiveConfig"),
    ("logger", "logger_schema", "pipeline.config:LoggerConfig"),
    ("editor", "editor_schema", "pipeline.config:EditorConfig"),
    ("editor", "rome_schema", "editors.config:RomeConfig"),
    ("editor", "memit_schema", "editors.config:MemitConfig"),
    ("editor", "alphaedit_schema", "editors.config:AlphaEditConfig"),
    ("editor", "ft_schema", "editors.config:FtConfig"),
    ("editor", "kn_schema", "editors.config:KnConfig"),
    ("editor", "mend_schema", "editors.config:MendConfig"),
    ("stage", "train_mend_schema", "pipeline.stages.config:TrainMendStageConfig"),
    ("stage", "edit_schema", "pipeline.stages.config:EditStageConfig"),
    ("stage", "summarize_schema", "pipeline.stages.config:SummarizeStageConfig"),
    ("stage", "known_schema", "pipeline.stages.config:KnownStageConfig"),
    ("stage", "trace_schema", "pipeline.stages.config:TraceStageConfig"),
    ("stage", "evaluate_schema", "pipeline.stages.config:EvaluateStageConfig"),
    ("stage", "full_schema", "pipeline.stages.config:FullStageConfig"),
    ("stage", "calibrate_schema", "pipeline.stages.config:CalibrateStageConfig"),
]


def _load(spec: str) -> type:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


MAX_DIRNAME = 200  # file systems cap a name at 255 bytes
MAX_SWEEP_NAME = 100
MAX_SEED = 2**32 - 1  # numpy's RandomState and torch.Generator both take [0, 2**32)


def check_sweep_name(name: Any) -> str:
    """``sweep_name`` is one plain directory name under ``outputs/``: no ``/``, no ``..``, short."""
    text = str(name)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.,=+-]*", text) or len(text) > MAX_SWEEP_NAME:
        raise ConfigError("sweep_name", text, f"not a plain directory name of at most {MAX_SWEEP_NAME} characters",
                          hint="use letters, digits and _ . , = + - (no '/', no '..'), e.g. sweep_name=my_study")
    return text


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError("seed", seed, f"not an integer in [0, {MAX_SEED}]", hint="use e.g. seed=0")
    return seed


ROOT_CHECKS = {"sweep_name": check_sweep_name, "seed": check_seed}


def check_cli_overrides(args: list[str]) -> None:
    """Check ``sweep_name``, ``seed`` and group-choice overrides (every value of a sweep) before Hydra
    starts: a bad one would otherwise fail inside Hydra's job-dir logic, or after a sweep's first jobs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:  # noqa: BLE001 - a syntax error is Hydra's to report, with its own message
        return
    for override in overrides:
        key = override.key_or_group
        if override.is_delete() or (key not in ROOT_CHECKS and not (CONF_DIR / key).is_dir()):
            continue
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        for value in values:
            if key in ROOT_CHECKS:
                ROOT_CHECKS[key](value)
            elif isinstance(value, str):
                check_group_choices({key: value})


def schema_names(group: str) -> set[str]:
    """Names registered for ``group`` in the ConfigStore (internal; never a user's choice)."""
    return {name for schema_group, name, _ in SCHEMAS if schema_group == group}


def check_group_choices(choices: Mapping[str, Optional[str]]) -> None:
    """Refuse a group choice that is a registered schema (``editor=rome_schema``), not an option.

    The schemas are registered in Hydra's ConfigStore so that the option yamls can extend them, so
    Hydra also accepts them as choices and composes a node whose required fields are ``MISSING``;
    the job would then die deep inside a stage. Only schema names are refused: optional groups
    (``editor_model``, ``local``) record the name they looked for even when no such file exists.
    """
    for group, choice in choices.items():
        if choice is None or group.startswith("hydra"):
            continue
        if choice in schema_names(group):
            raise ConfigError(group, choice, "is the group's schema (its required fields are unset), not an option",
                              f"use one of {', '.join(available_options(group))}")


def validate_root(cfg: Any) -> None:
    """Checks of the top-level keys that a type cannot express; run before a job does any work."""
    check_sweep_name(cfg.sweep_name)
    check_seed(cfg.seed)


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


def help_groups() -> str:
    """``--help``'s list of groups and options, read from the yamls: Hydra's own list would also offer the
    ConfigStore schemas (``editor/rome_schema``), which are not options (``conf/hydra/default.yaml``)."""
    return "\n".join(f"{group}: {', '.join(available_options(group))}" for group in config_groups())


def register_configs() -> None:
    """Register schemas and resolvers (idempotent; called by the entry point and by tests)."""
    store = ConfigStore.instance()
    for group, name, spec in SCHEMAS:
        store.store(group=group, name=name, node=_load(spec))
    if not OmegaConf.has_resolver("kloc.sweep"):
        OmegaConf.register_new_resolver("kloc.sweep", check_sweep_name)
    if not OmegaConf.has_resolver("kloc.cwd"):
        OmegaConf.register_new_resolver("kloc.cwd", lambda: os.getcwd())
    if not OmegaConf.has_resolver("kloc.help_groups"):
        OmegaConf.register_new_resolver("kloc.help_groups", help_groups)
    if not OmegaConf.has_resolver("kloc.dirname"):
        OmegaConf.register_new_resolver("kloc.dirname", dirname_from_overrides)
    if not OmegaConf.has_resolver("kloc.cache_dir"):
        OmegaConf.register_new_resolver("kloc.cache_dir", lambda: str(default_cache_dir()))
