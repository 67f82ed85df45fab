"""Refuse config-group choices that Hydra offers but that are not options of ours.

``pipeline.config`` registers each group's schema in Hydra's ConfigStore (``editor/rome_schema``,
``stage/edit_schema``, ...) so that the option yamls can extend it. Hydra therefore also accepts
``editor=rome_schema`` on the command line, and composes a node whose required fields are
``MISSING``: the job then dies deep inside a stage with OmegaConf's ``MissingMandatoryValue``.
The entry point calls ``check_group_choices(HydraConfig.get().runtime.choices)`` before any work,
so the user gets the group, the value and the real options instead.
"""

from __future__ import annotations

from typing import Mapping, Optional

from core.conf import available_options
from core.errors import ConfigError
from pipeline.config import SCHEMAS


def schema_names(group: str) -> set[str]:
    """Names registered for ``group`` in the ConfigStore (internal; never a user's choice)."""
    return {name for schema_group, name, _ in SCHEMAS if schema_group == group}


def check_group_choices(choices: Mapping[str, Optional[str]]) -> None:
    """Raise ConfigError for the first group whose choice is a registered schema, not an option.

    Only schema names are refused: optional groups (``editor_model``, ``local``) record the name
    they looked for even when no such file exists, so "not a yaml in conf/" is not an error here.
    """
    for group, choice in choices.items():
        if choice is None or group.startswith("hydra"):
            continue
        if choice in schema_names(group):
            raise ConfigError(group, choice, "is the group's schema (its required fields are unset), not an option",
                              f"use one of {', '.join(available_options(group))}")
