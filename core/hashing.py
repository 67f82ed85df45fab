"""Content addresses for caches: a hash of a canonical JSON of everything that changes a result."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from core.io import atomic_write_json, read_json


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:length]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


class CacheEntry:
    """A cache directory entry ``<root>/<kind>/<hash>/`` with the key JSON stored beside the blob.

    ``done`` is true only once ``key.json`` has been written, which callers do last (after the
    payload files), so a half-written entry is never read.
    """

    def __init__(self, root: str | os.PathLike, kind: str, key: dict[str, Any]) -> None:
        self.key = key
        self.digest = content_hash(key)
        self.dir = Path(root) / kind / self.digest

    @property
    def done(self) -> bool:
        marker = self.dir / "key.json"
        return marker.exists() and read_json(marker) == json.loads(canonical_json(self.key))

    def path(self, name: str) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir / name

    def mark_done(self) -> None:
        atomic_write_json(self.dir / "key.json", json.loads(canonical_json(self.key)))

    def lock(self, timeout: float = -1):
        """An inter-process lock so that parallel jobs never both compute and write this entry."""
        from filelock import FileLock

        self.dir.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.dir) + ".lock", timeout=timeout)
