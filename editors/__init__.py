"""Knowledge editors (ROME, r-ROME, ROME at attention, MEMIT, AlphaEdit, FT, KN, MEND) over shared helpers: keys, values, stats, templates, deltas.

    editor = build_editor(RomeConfig(layers=[5]), cache_dir=".cache")
    with editor.apply(loaded, [entity_request(fact)]) as result:
        ...  # the model is edited here; restored bit-for-bit on exit
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

from core.checks import check_choice
from core.errors import ConfigError
from core.lazy import lazy_exports
from editors.config import LocateEditConfig
from editors.requests import EditRequest, Rewrite, entity_request, relation_request

# torch-heavy re-exports, imported on first use: ``editors.config`` (the schemas) stays torch-free
__getattr__ = lazy_exports(__name__, {"editors.base": ("EditResult", "Editor"), "editors.deltas": ("WeightDeltas", "applied")})

# editor name -> "module:Class" (imported lazily; the config name selects the editor)
EDITORS: dict[str, str] = {"rome": "editors.rome:Rome", "memit": "editors.memit:Memit", "ft": "editors.ft:Ft",
                           "kn": "editors.kn:Kn", "mend": "editors.mend:Mend", "alphaedit": "editors.alphaedit:AlphaEdit",
                           "r_rome": "editors.rome:Rome", "rome_attn": "editors.rome_attn:RomeAttn"}


def check_editor_config(config) -> None:
    """Refuse a config whose ``name`` is not the one its schema was made for.

    ``editor.name=memit`` on ``editor=rome`` keeps ROME's schema and hyperparameters but would
    pick MEMIT's module, which then fails on fields ROME's config lacks. The name is fixed by the
    option yaml (each schema's default ``name``), so a changed name is always a mistake; stages
    call this before loading the model.
    """
    name = getattr(config, "name", None)
    fields = {f.name: f for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else {}
    schema_name = fields["name"].default if "name" in fields else dataclasses.MISSING
    variants = getattr(type(config), "variants", ())  # named variants of one schema (RomeConfig: r_rome)
    if isinstance(schema_name, str) and schema_name != "???" and name != schema_name and name not in variants:
        raise ConfigError("editor.name", name, f"the {schema_name} config (editor={schema_name}) cannot run another editor",
                          f"choose the editor with editor={name}, not editor.name (the name comes with the option)")
    if name != "none":
        check_choice("editor", name, sorted(EDITORS), "not an editor")


def build_editor(config, cache_dir: str | Path | None = None, data_dir: str | Path | None = None) -> "Editor":
    """The editor named by ``config.name``, bound to its config and the cache/data dirs."""
    check_editor_config(config)
    name = check_choice("editor", config.name, sorted(EDITORS), "not an editor")
    module, cls = EDITORS[name].split(":")
    return getattr(importlib.import_module(module), cls)(config, cache_dir=cache_dir, data_dir=data_dir)


__all__ = ["EDITORS", "EditRequest", "EditResult", "Editor", "LocateEditConfig", "Rewrite", "WeightDeltas", "applied",
           "build_editor", "check_editor_config", "entity_request", "relation_request"]
