"""A job's config fingerprint: what must match for a finished job dir to serve its results again.

The fingerprint hashes the resolved config minus the keys that do not change results (``force``,
``cache``, the logger, the paths themselves, progress bars, device sharding). Values derived from a path (e.g. the
summarize stage's ``sweep_dir``) are written relative to it, so moving a project does not
invalidate its jobs, while changing a default in a yaml does.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from core.hashing import content_hash

# Top-level keys that never change a job's results.
IGNORED_ROOT_KEYS = ("force", "cache", "logger", "paths", "hydra", "sweep_name")
# Keys ignored at any depth: progress bars, and where a stage runs (``fabric``: sharding over N
# devices gathers the same results, as tests/test_distributed.py checks).
IGNORED_LEAF_KEYS = ("progress", "fabric")


def comparable_config(cfg: DictConfig | dict) -> dict[str, Any]:
    """The flattened ``{dotted.key: value}`` of everything that changes results."""
    container = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    paths = sorted(((f"${{paths.{k}}}", str(v)) for k, v in (container.get("paths") or {}).items() if v),
                   key=lambda item: -len(item[1]))  # the longest path first: data_dir before root_dir
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if (not prefix and key in IGNORED_ROOT_KEYS) or key in IGNORED_LEAF_KEYS:
                    continue
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = _relative(node, paths)

    walk(container, "")
    return flat


def config_fingerprint(cfg: DictConfig | dict) -> str:
    return content_hash(comparable_config(cfg))


def config_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 8) -> list[str]:
    """``key: old -> new`` lines of the keys whose values differ (at most ``limit``, then a count)."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>"))
    lines = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"... and {len(keys) - limit} more")
    return lines


def _relative(value: Any, paths: list[tuple[str, str]]) -> Any:
    if isinstance(value, list):
        return [_relative(v, paths) for v in value]
    if isinstance(value, str):
        for placeholder, path in paths:
            if value == path or value.startswith(path.rstrip("/") + "/"):
                return placeholder + value[len(path.rstrip("/")):]
    return value
