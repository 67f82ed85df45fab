"""Out-of-memory back-off for batched forward passes.

A batch size that fits one model, prompt set or GPU does not fit the next; an OOM late in a sweep
should cost a smaller batch, not the run. ``halving_map`` runs a batched function chunk by chunk
and, on an accelerator OOM, halves the chunk and retries it. Results are concatenated in input
order, so callers whose per-item results do not depend on the batch (right padding with an
attention mask) get the same numbers at any chunk size.
"""

from __future__ import annotations

import gc
import logging
from typing import Callable, Sequence, TypeVar

import torch

from core.errors import ConfigError, ToolkitError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

OOM_HINT = ("use a smaller model dtype (model.dtype=bfloat16 or float16), shorter prompts, "
            "or model.device_map=auto to spread the model over devices")


def is_oom(err: BaseException) -> bool:
    """True for torch's OutOfMemoryError and RuntimeErrors that report an allocator out of memory.

    Older torch releases and the MPS/HIP/CPU allocators raise a plain RuntimeError ("CUDA out of
    memory", "MPS backend out of memory", "DefaultCPUAllocator: can't allocate memory").
    """
    if isinstance(err, torch.OutOfMemoryError):
        return True
    if not isinstance(err, RuntimeError):
        return False
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text


def free_memory() -> None:
    """Drop unreachable tensors and return cached accelerator blocks, so a retry starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def halving_map(fn: Callable[[list[T]], list[R]], items: Sequence[T], batch_size: int, *,
                what: str = "batch") -> list[R]:
    """``fn`` over consecutive chunks of at most ``batch_size`` items; results concatenated in order.

    On out-of-memory the chunk is halved and retried (a warning per halving), and the smaller size
    is kept for the remaining chunks. A single item that still runs out of memory raises a
    ``ToolkitError`` naming ``<what>_size=1``. ``fn`` must return one result per item.
    """
    key = f"{what}_size"
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(key, batch_size, "must be a positive integer", hint="use 1 or more")
    results: list[R] = []
    size, start = batch_size, 0
    while start < len(items):
        chunk = list(items[start:start + size])
        failed = False
        try:
            out = fn(chunk)
        except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError
            if not is_oom(err):
                raise
            if len(chunk) == 1:
                raise ToolkitError(key, 1, f"out of memory even with one item per {what}", hint=OOM_HINT) from err
            failed = True
        if failed:
            # Retry outside the except block: the traceback (and the tensors its frames hold) is gone.
            size = len(chunk) // 2
            log.warning("out of memory at %s size %d; retrying with %d", what, len(chunk), size)
            free_memory()
            continue
        if not isinstance(out, Sequence) or len(out) != len(chunk):
            got = f"{len(out)} results" if isinstance(out, Sequence) else f"a {type(out).__name__}, not a list,"
            raise ToolkitError("fn", getattr(fn, "__qualname__", repr(fn)), f"returned {got} for {len(chunk)} items",
                               hint="return exactly one result per item, in order")
        results.extend(out)
        start += len(chunk)
    return results
