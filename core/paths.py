"""Checks of user-given paths, so a wrong one gets a named error instead of an OSError deep inside.

A file where a directory is expected (a cache dir, a data dir, a local model) or a directory
where a file is expected (``dataset.path``) otherwise surfaces as ``NotADirectoryError`` from a
``mkdir`` halfway through a job, an ``IsADirectoryError`` from a read, or, for a data dir, as a
silent fallback to the bundled copies.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from core.errors import ConfigError, ToolkitError

CACHE_ENV = "KLOC_CACHE_DIR"
CACHE_NAME = "knowledge-localization"


def default_cache_dir() -> Path:
    """The one default cache dir: ``$KLOC_CACHE_DIR``, else ``${XDG_CACHE_HOME:-~/.cache}/knowledge-localization``.

    User-level, not per working directory, so a notebook in any folder, a script and the CLI reuse
    the converted model, the statistics and the templates instead of recomputing them. The config's
    ``paths.cache_dir`` defaults to this too (resolver ``kloc.cache_dir``), and overrides it per job.
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / CACHE_NAME


def writable_dir(key: str, path: str | Path, error: type[ToolkitError] = ConfigError) -> Path:
    """``path`` is a directory or can be created as one (no part of it is a file)."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                where = "is a file" if part == path else f"lies under the file {part}"
                raise error(key, str(path), f"{where}, not a directory", "point it at a directory (or remove the file)")
            return path
    return path


def optional_dir(key: str, path: Optional[str | Path], error: type[ToolkitError] = ConfigError) -> Optional[Path]:
    """A directory that may be absent (then callers fall back), but is never a file."""
    if path is None or str(path) == "":
        return None
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(key, str(path), "is a file, not a directory", "point it at a directory, or remove the setting")
    return path


def existing_file(key: str, path: str | Path, error: type[ToolkitError], hint: str) -> Path:
    """``path`` exists and is a regular file (not a directory)."""
    path = Path(path)
    if not path.exists():
        raise error(key, str(path), "file does not exist", hint)
    if path.is_dir():
        raise error(key, str(path), "is a directory, not a file", hint)
    return path
