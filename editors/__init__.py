"""Knowledge editors (ROME, MEMIT) over shared helpers: keys, values, stats, templates, deltas.

    editor = build_editor(RomeConfig(layers=[5]), cache_dir=".cache")
    with editor.apply(loaded, [entity_request(fact)]) as result:
        ...  # the model is edited here; restored bit-for-bit on exit
"""

from __future__ import annotations

import importlib
from pathlib import Path

from core.errors import ConfigError
from editors.base import EditResult, Editor, LocateEditConfig
from editors.deltas import WeightDeltas, applied
from editors.requests import EditRequest, Rewrite, entity_request, relation_request

# editor name -> "module:Class" (imported lazily; the config name selects the editor)
EDITORS: dict[str, str] = {"rome": "editors.rome:Rome", "memit": "editors.memit:Memit", "ft": "editors.ft:Ft",
                           "kn": "editors.kn:Kn", "mend": "editors.mend:Mend"}


def build_editor(config, cache_dir: str | Path | None = None, data_dir: str | Path | None = None) -> Editor:
    """The editor named by ``config.name``, bound to its config and the cache/data dirs."""
    name = getattr(config, "name", None)
    if name not in EDITORS:
        raise ConfigError("editor", name, "not an editor", f"use one of {', '.join(sorted(EDITORS))}")
    module, cls = EDITORS[name].split(":")
    return getattr(importlib.import_module(module), cls)(config, cache_dir=cache_dir, data_dir=data_dir)


__all__ = ["EDITORS", "EditRequest", "EditResult", "Editor", "LocateEditConfig", "Rewrite", "WeightDeltas", "applied",
           "build_editor", "entity_request", "relation_request"]
