"""Sharding facts across devices with Lightning Fabric: one model replica per rank, results gathered.

``map_sharded(task, items, devices)`` splits ``items`` round-robin over ``devices`` processes
(ranks), runs ``task(shard, device)`` on each, and returns the per-item results in the input
order, identical to ``task(items, device)`` in one process. Tasks load their own model replica
on the device they are given, so they must be picklable (top-level functions or partials).
Models too big for one GPU are split with ``model.device_map=auto`` instead (accelerate).
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

from core.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it runs: FabricConfig is part of the torch-free stage schemas
    import torch

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
ShardTask = Callable[[list, "torch.device"], list]


@dataclass
class FabricConfig:
    """Where a job's work runs: ``devices`` ranks on ``accelerator`` (auto: cuda if available)."""

    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "ddp_spawn"

    def validate(self) -> None:
        if self.devices < 1:
            raise ConfigError("fabric.devices", self.devices, "must be >= 1", "use 1 for a single process")
        if self.accelerator not in ("auto", "cpu", "cuda", "gpu"):
            raise ConfigError("fabric.accelerator", self.accelerator, "unknown accelerator", "use auto, cpu or cuda")


def _accelerator(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name == "gpu" else name


def shard_indices(n_items: int, rank: int, world_size: int) -> list[int]:
    """Round-robin shard of ``range(n_items)`` for ``rank`` (balanced when item costs vary smoothly)."""
    return list(range(rank, n_items, world_size))


def map_sharded(task: ShardTask, items: Sequence[T], config: FabricConfig | None = None) -> list:
    """Run ``task`` over ``items`` on ``config.devices`` ranks and gather the results in order."""
    config = config or FabricConfig()
    config.validate()
    accelerator = _accelerator(config.accelerator)
    if config.devices == 1:
        import torch

        device = torch.device("cuda" if accelerator == "cuda" else "cpu")
        return list(task(list(items), device))
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator=accelerator, devices=config.devices, strategy=config.strategy)
    log.info("sharding %d items over %d %s ranks", len(items), config.devices, accelerator)
    # Results travel pickled: Fabric's launcher walks returned collections and refuses frozen dataclasses.
    return pickle.loads(fabric.launch(functools.partial(_worker, task=task, items=list(items))))


def _worker(fabric, task: ShardTask, items: list) -> bytes:
    # Rust tokenizer thread pools in forked/spawned ranks can abort at interpreter exit.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    indices = shard_indices(len(items), fabric.global_rank, fabric.world_size)
    results = list(task([items[i] for i in indices], fabric.device))
    if len(results) != len(indices):
        raise RuntimeError(f"task returned {len(results)} results for {len(indices)} items")
    import torch

    gathered: list = [None] * fabric.world_size
    torch.distributed.all_gather_object(gathered, list(zip(indices, results)))
    torch.distributed.barrier()
    merged = sorted(chain.from_iterable(gathered), key=lambda pair: pair[0])
    torch.distributed.destroy_process_group()  # tear down gloo before the rank's interpreter exits
    return pickle.dumps([result for _, result in merged])
