"""Where the config tree lives (``conf/``) and which options a config group offers.

Below ``pipeline/`` nothing composes with Hydra, but a few helpers read a group's option files
directly (``models.config.model_config_by_name``, error hints that list the valid choices).
"""

from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def available_options(group: str) -> list[str]:
    """The option names of a config group (``"model"``, ``"hydra/launcher"``): its yaml files' stems."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
