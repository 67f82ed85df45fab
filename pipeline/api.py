"""The pipeline's configs and its edit stage as plain Python calls, for notebooks and scripts.

The settings come from the same ``conf/`` tree the CLI composes, so a notebook never copies a
value out of a yaml (``layers=[6]`` and the statistics size of ``conf/editor_model/``, the trace
stage's window and sample count) and cannot drift from what ``python -m pipeline.run`` would use:

    >>> from pipeline.api import editor_config, trace_settings, edit_and_evaluate
    >>> rome = editor_config("rome", model="smollm2_135m", **{"stats.n_samples": 200})
    >>> settings = trace_settings(samples=3, kinds=["hidden"])          # tracing.TraceSettings
    >>> outcome = edit_and_evaluate(loaded, facts, editor=rome, perspective="relation")
    >>> outcome.table                                                   # metrics.aggregate.EvaluationTable

Overrides are keyword arguments relative to the group (``v_lr=0.1``; a dotted key via
``**{"stats.n_samples": 200}``) or CLI strings in ``overrides`` (``["editor.v_lr=0.1"]``). Both go
through Hydra's compose, so a misspelled key or a wrong type fails here, as on the command line.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from core.conf import CONF_DIR, available_options
from core.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.stages.edit import EditOutcome

DEFAULT_MODEL = None  # None: the model of conf/config.yaml's defaults list (the one place it is named)


def override_value(value: Any) -> str:
    """A Python value in Hydra's override grammar (strings quoted, so ``"1e-3"`` stays a string)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{key}:{override_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, Iterable):
        return "[" + ",".join(override_value(item) for item in value) + "]"
    raise ConfigError("override", repr(value), f"a {type(value).__name__} has no config form", "use a number, string, bool, None, list or dict")


def keyword_overrides(prefix: str, values: Mapping[str, Any]) -> list[str]:
    """``{"stats.n_samples": 200}`` -> ``["editor.stats.n_samples=200"]`` for ``prefix="editor"``."""
    return [f"{prefix}.{key}={override_value(value)}" for key, value in values.items()]


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The primary config with CLI-style ``overrides``, exactly as ``python -m pipeline.run`` composes it.

    Works inside a notebook, inside pytest and inside a running Hydra app: the global Hydra state
    is set aside for the compose and put back afterwards, so neither side sees the other's.
    """
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from pipeline.config import register_configs

    register_configs()
    _check_options(overrides)
    saved = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError("overrides", " ".join(overrides), _reason(err),
                          "check the key against conf/ (python -m pipeline.run --cfg job shows every key)") from err
    finally:
        restore_gh_from_backup(saved)


def _reason(err: BaseException) -> str:
    """Hydra's first line plus its cause's (``Could not override 'editor.v_lr'``: ``could not convert 'fast'``)."""
    lines = [str(e).strip().splitlines()[0] for e in (err, err.__cause__) if e is not None and str(e).strip()]
    return ": ".join(dict.fromkeys(lines)) or type(err).__name__


def _check_options(overrides: Sequence[str]) -> None:
    """An unknown group option is a ConfigError that lists the group's options (Hydra only says "not found")."""
    for override in overrides:
        group, _, option = override.partition("=")
        if (option not in ("", "null") and "." not in group and not group.startswith("hydra") and (CONF_DIR / group).is_dir()
                and option not in available_options(group)):
            raise ConfigError(group, option, "not an option of this config group",
                              f"use one of {', '.join(available_options(group))}")


def _choices(model: Optional[str], **groups: Optional[str]) -> list[str]:
    return [f"{group}={option}" for group, option in {"model": model, **groups}.items() if option is not None]


def editor_config(name: str, model: Optional[str] = DEFAULT_MODEL, overrides: Sequence[str] = (), **values: Any):
    """The typed config of editor ``name`` for ``model`` (e.g. ``editors.rome.RomeConfig``).

    ``conf/editor/<name>.yaml`` plus ``conf/editor_model/<name>_<model>.yaml`` (the per-model
    layers and statistics size), as ``editor=<name> model=<model>`` composes them on the CLI.
    """
    cfg = compose([*_choices(model, editor=name), *overrides, *keyword_overrides("editor", values)])
    return OmegaConf.to_object(cfg.editor)


def model_config(name: str, overrides: Sequence[str] = (), **values: Any):
    """The typed ``models.ModelConfig`` of ``conf/model/<name>.yaml`` (e.g. ``dtype="bfloat16"``)."""
    cfg = compose([f"model={name}", *overrides, *keyword_overrides("model", values)])
    return OmegaConf.to_object(cfg.model)


def stage_config(name: str, model: Optional[str] = DEFAULT_MODEL, overrides: Sequence[str] = (), **values: Any):
    """The typed config of stage ``name`` (e.g. ``pipeline.stages.edit.EditStageConfig``), validated."""
    cfg = compose([*_choices(model, stage=name), *overrides, *keyword_overrides("stage", values)])
    settings = OmegaConf.to_object(cfg.stage)
    if hasattr(settings, "validate"):
        settings.validate()
    return settings


def trace_settings(model: Optional[str] = DEFAULT_MODEL, seed: Optional[int] = None, overrides: Sequence[str] = (),
                   **values: Any):
    """The ``tracing.TraceSettings`` the trace stage would use (its schema defaults, ``conf/stage/trace.yaml`` + overrides).

    ``seed`` defaults to the config's ``seed``, as in a job.
    """
    cfg = compose([*_choices(model, stage="trace"), *overrides, *keyword_overrides("stage", values)])
    return OmegaConf.to_object(cfg.stage).trace_settings(cfg.seed if seed is None else seed)


def dataset_config(name: str, overrides: Sequence[str] = (), **values: Any):
    """The typed ``facts.DatasetConfig`` of ``conf/dataset/<name>.yaml`` (e.g. ``limit=2``)."""
    cfg = compose([f"dataset={name}", *overrides, *keyword_overrides("dataset", values)])
    return OmegaConf.to_object(cfg.dataset)


def paths_config(overrides: Sequence[str] = ()) -> dict[str, str]:
    """The resolved ``paths`` (root, data, output and cache dirs) as a job would see them."""
    cfg = compose(list(overrides))
    return OmegaConf.to_container(cfg.paths, resolve=True)


def edit_and_evaluate(loaded, facts: Sequence, editor: str | Any = "rome", perspective: str = "entity",
                      overrides: Sequence[str] = (), cache_dir: str | Path | None = None, **stage_values: Any) -> "EditOutcome":
    """Edit ``facts`` with ``editor`` from ``perspective`` and score both sides before and after.

    Returns a ``pipeline.stages.edit.EditOutcome``: ``rows`` (per case ``pre``, ``post``, ``edit``),
    ``tidy()`` (one row per case, side and metric, for pandas), ``table`` (the aggregate
    ``EvaluationTable``) and ``markdown()``. This is the edit stage (``pipeline.stages.edit.compute_edits``)
    without a job dir: the same cases, requests, scoring and aggregate. ``editor`` is a name (its config composed for
    ``loaded``'s model) or a config from ``editor_config``; ``stage_values`` override the edit
    stage (``n_cases``, ``quality={"enabled": False}``, ...). ``n_cases`` defaults to every fact.
    """
    from pipeline.stages.edit import compute_edits

    model = loaded.config.name
    stage_values = {"n_cases": max(1, len(facts)), "progress": False, **stage_values}
    editor_name = editor if isinstance(editor, str) else editor.name
    # A model outside conf/model (a user's dict) still works with a typed editor config (its layers set).
    choices = [f"model={model}"] if model in available_options("model") else []
    choices += [f"editor={editor_name}", f"perspective={perspective}", "stage=edit", "logger=none"]
    if cache_dir is not None:
        choices.append(f"paths.cache_dir={override_value(str(cache_dir))}")
    cfg = compose([*choices, *overrides, *keyword_overrides("stage", stage_values)])
    if not isinstance(editor, str):  # a typed config from editor_config(): it replaces the composed one
        cfg.editor = OmegaConf.structured(editor)
    cfg.model = OmegaConf.structured(loaded.config)  # the loaded model's own settings (dtype, revision)
    settings = OmegaConf.to_object(cfg.stage)
    settings.validate()
    with tempfile.TemporaryDirectory(prefix="kloc-edit-") as job_dir:  # resume files only; removed after
        return compute_edits(cfg, settings, loaded, list(facts), Path(job_dir))


__all__ = ["compose", "dataset_config", "edit_and_evaluate", "editor_config", "keyword_overrides", "model_config",
           "override_value", "paths_config", "stage_config", "trace_settings"]
