"""Content addresses for caches: a hash of a canonical JSON of everything that changes a result.

A ``CacheEntry`` is read without a lock and without creating anything (so a read-only cache
that holds every entry works), and computed under a lock with a second check (so parallel jobs
compute each entry once). A corrupt entry is a ``CacheError`` naming the bad file; under
``repairing(True)`` (``cache.repair=true`` or ``force=true``) it is deleted and recomputed.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from core.errors import CacheError
from core.io import atomic_write_json, load_tensors, read_json, read_jsonl

log = logging.getLogger(__name__)

T = TypeVar("T")

# Scoped, not global: each pipeline stage call sets it (contextvars also keep threads apart).
_REPAIR: contextvars.ContextVar[bool] = contextvars.ContextVar("kloc_cache_repair", default=False)

WRITABLE_HINT = "point KLOC_CACHE_DIR (or paths.cache_dir) at a writable dir"


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


@contextlib.contextmanager
def repairing(enabled: bool = True) -> Iterator[None]:
    """Within this block a corrupt cache entry is deleted and recomputed instead of raising."""
    token = _REPAIR.set(bool(enabled))
    try:
        yield
    finally:
        _REPAIR.reset(token)


def repair_enabled() -> bool:
    return _REPAIR.get()


def corrupt_error(kind: str, path: str | os.PathLike, cause: BaseException, entry_dir: str | os.PathLike) -> CacheError:
    return CacheError(f"cache.{kind}", str(path), f"corrupt or truncated cache entry ({type(cause).__name__}: {cause})",
                      f"rerun with cache.repair=true (or force=true) to recompute it, or delete {entry_dir}")


def read_cached(kind: str, path: str | os.PathLike, loader: Callable[[Path], T] = read_json) -> T:
    """``loader(path)`` for a file of a cache entry; any failure is a ``CacheError`` naming the file."""
    path = Path(path)
    try:
        return loader(path)
    except CacheError:
        raise
    except Exception as err:  # json, safetensors, unicode, OS: all mean the same to a reader
        raise corrupt_error(kind, path, err, path.parent) from err


class CacheEntry:
    """A cache directory entry ``<root>/<kind>/<hash>/`` with the key JSON stored beside the blob.

    ``done`` is true only once the marker (``key.json``) has been written, which callers do last
    (after the payload files), so a half-written entry is never read. ``name`` and ``marker``
    let an entry keep a readable directory name (converted models).
    """

    def __init__(self, root: str | os.PathLike, kind: str, key: dict[str, Any], name: str | None = None,
                 marker: str = "key.json") -> None:
        self.key = key
        self.kind = kind
        self.root = Path(root)
        self.digest = content_hash(key)
        self.dir = self.root / kind / (name or self.digest)
        self.marker = marker

    @property
    def done(self) -> bool:
        """Marker present and equal to the key; a corrupt marker raises (or, repairing, is not done)."""
        marker = self.dir / self.marker
        if not marker.exists():
            return False
        try:
            return self.read(self.marker) == json.loads(canonical_json(self.key))
        except CacheError:
            if repair_enabled():
                return False
            raise

    def path(self, name: str) -> Path:
        """Where a file of this entry lives (creates nothing: writers make the dir)."""
        return self.dir / name

    def read(self, name: str, loader: Callable[[Path], T] = read_json) -> T:
        """``loader(<dir>/name)``; any failure is a ``CacheError`` that names the file."""
        return read_cached(self.kind, self.dir / name, loader)

    def read_jsonl(self, name: str) -> list[dict]:
        return self.read(name, read_jsonl)

    def read_tensors(self, name: str) -> dict:
        return self.read(name, load_tensors)

    def try_read(self, read: Callable[["CacheEntry"], T]) -> tuple[bool, T | None]:
        """``(True, read(self))`` when done and readable; ``(False, None)`` when missing or, while
        repairing, corrupt. Otherwise a corrupt entry raises ``CacheError``. Never writes."""
        try:
            if not self.done:
                return False, None
            try:
                return True, read(self)
            except CacheError:
                raise
            except Exception as err:  # a payload that parses but does not fit (missing field, bad shape)
                raise corrupt_error(self.kind, self.dir, err, self.dir) from err
        except CacheError as err:
            if not repair_enabled():
                raise
            log.warning("repairing %s: %s", self.dir, err.problem)
            return False, None

    def load_or_compute(self, read: Callable[["CacheEntry"], T], compute: Callable[["CacheEntry"], T]) -> T:
        """Read the entry, or compute it once: check, lock, check again, ``compute`` (which writes
        the payload files), mark done. A complete entry is read without taking the lock."""
        found, value = self.try_read(read)
        if found:
            return value  # type: ignore[return-value]
        with self.lock():
            found, value = self.try_read(read)
            if found:
                return value  # type: ignore[return-value]
            self.clear()
            value = compute(self)
            self.mark_done()
            return value

    def clear(self) -> None:
        """Remove a stale or corrupt entry (marker first, so no reader takes it for done)."""
        (self.dir / self.marker).unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def mark_done(self) -> None:
        atomic_write_json(self.dir / self.marker, json.loads(canonical_json(self.key)))

    @contextlib.contextmanager
    def lock(self, timeout: float = -1) -> Iterator[None]:
        """An inter-process lock (``<dir>.lock``) so that parallel jobs never both compute and write
        this entry; only taken to compute, so a read-only cache that holds the entry is never locked."""
        from filelock import FileLock

        try:
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.dir) + ".lock", timeout=timeout)
            lock.acquire()
        except TimeoutError:  # filelock.Timeout: busy, not unwritable
            raise
        except OSError as err:
            raise CacheError("paths.cache_dir", str(self.root), f"cannot write the missing {self.kind} entry "
                             f"{self.dir.name} ({type(err).__name__}: {err})", WRITABLE_HINT) from err
        try:
            yield
        finally:
            lock.release()
