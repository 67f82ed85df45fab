"""Where the config tree lives (``conf/``) and which options a config group offers.

Below ``pipeline/`` nothing composes with Hydra, but a few helpers read a group's option files
directly (``models.config.model_config_by_name``, error hints that list the valid choices).
"""

from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def config_groups() -> list[str]:
    """The user-facing config groups: every folder of ``conf/`` holding option yamls, except Hydra's own."""
    folders = {p.parent.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*.yaml") if p.parent != CONF_DIR}
    return sorted(group for group in folders if group != "hydra" and not group.startswith("hydra/"))


def available_options(group: str) -> list[str]:
    """The option names of a config group (``"model"``, ``"hydra/launcher"``): its yaml files' stems."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
