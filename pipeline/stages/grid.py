"""Calibration grids: an editor's search space (``stage.search.<editor>``) expanded into typed configs.

A space maps editor config keys (dotted for nested fields, e.g. ``stats.n_samples``) to a list of
values, or ``auto`` for ``layers``; the points are the product of the lists in the order given
(the first key varies slowest). ``auto`` is sized from the model: at most ``auto_points`` layers,
evenly strided, each a window of ``auto_window[editor]`` consecutive layers ending there (MEMIT
spreads an edit over a window; 1 for the others). The keys are checked against the editor's
schema before the model loads (``check_space``) and every point's values against its types and
the model's layer count before any edit (``point_configs``), so a typo never costs a run.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.errors import ConfigError
from pipeline.stages.config import UNCALIBRATED_EDITORS

AUTO = "auto"
AUTO_KEYS = ("layers",)
_ABSENT = object()


@dataclass(frozen=True)
class GridPoint:
    """One point of the grid: its position and the editor config values it sets."""

    index: int
    values: dict[str, Any]

    @property
    def label(self) -> str:
        return " ".join(f"{key}={format_value(value)}" for key, value in self.values.items())


def format_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return "null" if value is None else str(value)


def search_space(search: Mapping[str, Mapping[str, Any]], editor: str) -> dict[str, Any]:
    """The search space of ``editor``; editors without one (or that cannot have one) are refused."""
    if editor in UNCALIBRATED_EDITORS:
        raise ConfigError("editor", editor, f"stage=calibrate cannot calibrate it ({UNCALIBRATED_EDITORS[editor]})",
                          _uncalibrated_hint(editor, search))
    space = search.get(editor)
    if not space:
        raise ConfigError("stage.search", sorted(search), f"no search space for editor={editor}",
                          f"add stage.search.{editor} (e.g. '+stage.search.{editor}={{layers: auto}}')")
    return dict(space)


def _uncalibrated_hint(editor: str, search: Mapping[str, Any]) -> str:
    if editor == "mend":
        return ("sweep MEND's training instead: python -m pipeline.run -m stage=train_mend editor=mend "
                "editor.layers=[27,28,29],[24,25,26] stage.steps=300,1000 dataset.split=train, compare each job's "
                "validation.jsonl (its validation locality decides early stopping), then set layers in "
                "conf/editor_model/mend_<model>.yaml")
    return f"use one of {', '.join(sorted(search))}"


def check_space(space: Mapping[str, Any], editor_node: DictConfig, editor: str) -> None:
    """Every key is a field of the editor's config, and every value list is a non-empty list (or ``auto``)."""
    for key, values in space.items():
        where = f"stage.search.{editor}.{key}"
        if key == "name" or OmegaConf.select(editor_node, key, default=_ABSENT, throw_on_missing=False) is _ABSENT:
            fields = ", ".join(k for k in editor_node.keys() if k != "name")
            raise ConfigError(where, values, f"not a field of the {editor} config", f"use one of {fields}")
        if values == AUTO:
            if key not in AUTO_KEYS:
                raise ConfigError(where, values, "only layers can be auto", "list the values, e.g. [0.1, 0.2]")
        elif not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(where, values, "must be a non-empty list of values (or auto for layers)",
                              f"e.g. stage.search.{editor}.{key}=[...]")


def auto_layers(n_layers: int, auto_points: int, window: int = 1) -> list[list[int]]:
    """At most ``auto_points`` layer lists: windows of ``window`` layers ending at every stride-th layer."""
    stride = max(1, math.ceil(n_layers / auto_points))
    window = min(window, n_layers)
    ends = [end for end in range(0, n_layers, stride) if end >= window - 1] or [n_layers - 1]
    return [list(range(end - window + 1, end + 1)) for end in ends]


def expand(space: Mapping[str, Any], n_layers: int, auto_points: int, window: int = 1) -> list[GridPoint]:
    """The grid points of ``space``: the product of its value lists (``auto`` sized from ``n_layers``)."""
    lists = {key: auto_layers(n_layers, auto_points, window) if values == AUTO else list(values)
             for key, values in space.items()}
    return [GridPoint(index, dict(zip(lists, combo))) for index, combo in enumerate(itertools.product(*lists.values()))]


def point_configs(editor_node: DictConfig, points: list[GridPoint], editor: str, n_layers: int) -> list[tuple[DictConfig, Any]]:
    """Each point's editor node and typed config: the schema checks each value's type, ``validate`` the layers."""
    configs = []
    for point in points:
        node = copy.deepcopy(editor_node)
        for key, value in point.values.items():
            try:
                OmegaConf.update(node, key, copy.deepcopy(value), merge=False)
            except OmegaConfBaseException as err:
                raise ConfigError(f"stage.search.{editor}.{key}", value, f"not a valid editor.{key} "
                                  f"({str(err).splitlines()[0]})", "check the type in conf/editor/" + f"{editor}.yaml") from err
        try:
            config = OmegaConf.to_object(node)
            config.validate(n_layers)
        except ConfigError as err:
            raise ConfigError(f"stage.search.{editor}", point.label, f"grid point {point.index} is not a valid "
                              f"config ({err.key}={err.value!r}: {err.problem})", err.hint) from err
        configs.append((node, config))
    return configs
