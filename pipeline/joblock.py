"""One live process per job dir, and a ``status.json`` that tells a running job from a dead one.

SLURM requeues, resubmissions and a user's second terminal all start identical jobs. The job lock
(an OS file lock on ``<job_dir>/.job.lock``) makes the second one wait until the first is done,
then find its results and skip; the OS drops the lock when its holder dies, so a killed job never
blocks its rerun. While it holds the lock a job refreshes ``status.json``'s ``heartbeat`` (with its
pid and host), so ``job_state`` can say ``died`` for a job whose status still reads ``running``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from core.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

LOCK = ".job.lock"
STATUS = "status.json"
HEARTBEAT_SECONDS = 30.0
# A running job whose heartbeat is older than this many intervals is taken for dead.
STALE_HEARTBEATS = 4
WAIT_LOG_SECONDS = 60.0


def this_process() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def read_status(job_dir: Path) -> dict[str, Any] | None:
    try:
        return read_json(Path(job_dir) / STATUS)
    except (OSError, ValueError):
        return None


def job_state(job_dir: Path, now: float | None = None) -> str:
    """``none | running | died | done | failed | recompute_failed``: ``running`` only while its
    process is alive (same host) and its heartbeat is fresh."""
    status = read_status(job_dir)
    if status is None:
        return "none"
    if status.get("status") != "running":
        return str(status.get("status"))
    now = time.time() if now is None else now
    beat = status.get("heartbeat", status.get("started", 0))
    if now - beat > STALE_HEARTBEATS * status.get("heartbeat_seconds", HEARTBEAT_SECONDS):
        return "died"
    if status.get("host") == socket.gethostname() and not _alive(status.get("pid")):
        return "died"
    return "running"


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def job_lock(job_dir: Path) -> Iterator[None]:
    """Hold ``job_dir``'s lock; wait (logging who holds it) while another live job has it."""
    lock = FileLock(str(Path(job_dir) / LOCK))
    timeout = 0.0
    while True:
        try:
            lock.acquire(timeout=timeout)
            break
        except Timeout:
            status = read_status(job_dir) or {}
            log.info("%s is held by a running identical job (pid %s on %s, heartbeat %.0f s ago); waiting for it",
                     job_dir, status.get("pid"), status.get("host"), time.time() - status.get("heartbeat", time.time()))
            timeout = WAIT_LOG_SECONDS
    try:
        yield
    finally:
        lock.release()


class Heartbeat:
    """Refreshes ``status.json`` (``running``, pid, host, heartbeat) every ``interval`` seconds.

    ``update`` writes the status at once and keeps its fields for the next beats; ``stop`` ends the
    thread before the final status is written, so no beat can overwrite ``done`` or ``failed``.
    """

    def __init__(self, job_dir: Path, fields: dict[str, Any], interval: float | None = None) -> None:
        self.path = Path(job_dir) / STATUS
        self.interval = HEARTBEAT_SECONDS if interval is None else interval
        self.fields = {"status": "running", **fields, **this_process(), "heartbeat_seconds": self.interval}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="job-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._beat()
        self._thread.start()
        return self

    def _beat(self) -> None:
        with self._lock:
            if not self._stop.is_set():
                atomic_write_json(self.path, {**self.fields, "heartbeat": time.time()})

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except OSError as err:  # a full disk must not kill the job from a side thread
                log.warning("heartbeat not written (%s)", err)

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
        self._thread.join(timeout=5)
