"""Checks of user-given config values that raise ``ConfigError`` (key, value, problem, hint).

Config dataclasses call these from ``validate`` (and ``__post_init__`` where a value can be
checked without the model), so a bad value never reaches code that would fail with a bare
``TypeError`` about it.
"""

from __future__ import annotations

from typing import Any, Iterable

from core.errors import ConfigError, ToolkitError


def check_choice(key: str, value: Any, choices: Iterable[Any], problem: str = "unknown choice",
                 error: type[ToolkitError] = ConfigError) -> Any:
    """``value`` is one of ``choices``; else ``error(key, value, problem, "use one of ...")`` lists them."""
    choices = list(choices)
    if value not in choices:
        raise error(key, value, problem, f"use one of {', '.join(str(choice) for choice in choices)}")
    return value


LAYERS_HINT = "set editor.layers or add conf/editor_model/<editor>_<model>.yaml"


def check_layer_list(key: str, layers: Any, hint: str = LAYERS_HINT) -> list[int]:
    """``layers`` is a non-empty list of ints; refuses OmegaConf's ``MISSING`` (``'???'``), strings, bare ints."""
    if not isinstance(layers, (list, tuple)):
        problem = "required, and not set" if layers == "???" else "must be a list of layer indices"
        raise ConfigError(key, layers, problem, hint)
    if not layers:
        raise ConfigError(key, list(layers), "no layer to rewrite", hint)
    if not all(isinstance(layer, int) and not isinstance(layer, bool) for layer in layers):
        raise ConfigError(key, list(layers), "must be a list of layer indices (ints)", hint)
    return list(layers)


def check_layers(key: str, layers: Any, n_layers: int, hint: str = LAYERS_HINT) -> list[int]:
    """``check_layer_list``, and every layer in ``0..n_layers-1``."""
    layers = check_layer_list(key, layers, hint)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ConfigError(key, layers, f"out of range ({n_layers} layers)", f"use 0-{n_layers - 1}")
    return layers
