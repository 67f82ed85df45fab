"""The editor interface: ``editor.apply(loaded, requests) -> EditResult``, a context manager.

``apply`` changes the weights in place and returns the originals it needs to undo that; leaving
the ``with`` block restores them bit-for-bit, also after an exception inside the block. An
editor only computes its ``WeightDeltas`` (``compute``); snapshot, restore-on-failure and the
final application are here, so the edited weights are exactly ``original + delta`` and
``deltas.applied(model, result.deltas)`` reproduces them later.

Hyperparameters shared by the locate-then-edit editors (ROME, MEMIT) live in
``LocateEditConfig``; the per-model values (layers, statistics size) come from ``editor_model/``.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from torch import Tensor, nn

from editors.config import LocateEditConfig
from editors.deltas import WeightDeltas, add_in_place, restore, snapshot
from editors.requests import EditRequest, check_requests
from editors.templates import context_templates
from models.load import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class EditResult:
    """The edit in force: deltas, the original weights, per-request diagnostics. Restores on exit."""

    model: nn.Module
    deltas: WeightDeltas
    originals: dict[str, Tensor]
    infos: list[dict[str, Any]]
    seconds: float
    restored: bool = False
    # called after the weights are restored (AlphaEdit forgets the keys of the edit undone)
    on_restore: list[Callable[[], None]] = field(default_factory=list)

    def restore(self) -> None:
        if not self.restored:
            restore(self.model, self.originals)
            self.restored = True
            for callback in self.on_restore:
                callback()

    def __enter__(self) -> "EditResult":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.restore()
        return False


class Editor(ABC):
    """An editor bound to its config and cache/data dirs (statistics, templates, inverses are reused)."""

    name: ClassVar[str]
    # How many cases a pipeline edits at once by default (ROME: one at a time; MEMIT: batches).
    default_edit_batch_size: ClassVar[int] = 1
    # The projection ``apply`` snapshots on ``config.layers`` (models.adapters PROJECTIONS).
    edited_projection: ClassVar[str] = "mlp_out"

    def __init__(self, config: LocateEditConfig, cache_dir: str | Path | None = None, data_dir: str | Path | None = None) -> None:
        self.config = config
        self.cache_dir = cache_dir
        self.data_dir = data_dir

    def apply(self, loaded: LoadedModel, requests: Sequence[EditRequest]) -> EditResult:
        """Edit ``loaded.model`` in place; use the result as a context manager to restore it."""
        requests = check_requests(requests)
        self.config.validate(loaded.adapter.n_layers)
        originals = snapshot(loaded.model, self.edited_names(loaded))
        started = time.time()
        try:
            deltas, infos = self.compute(loaded, requests)
            restore(loaded.model, originals)
            add_in_place(loaded.model, deltas)
        except BaseException:
            restore(loaded.model, originals)
            raise
        return EditResult(loaded.model, deltas, originals, infos, time.time() - started)

    def edited_names(self, loaded: LoadedModel) -> list[str]:
        """The parameters ``compute`` may change (snapshotted by ``apply``): the layers' weights of
        ``edited_projection`` (the MLP or attention output projection)."""
        model, adapter, projection = loaded.model, loaded.adapter, self.edited_projection
        return WeightDeltas.for_projection(model, adapter, projection, {
            layer: adapter.projection_matrix(model, projection, layer) for layer in self.config.layers}).names()

    def apply_read_only(self, loaded: LoadedModel, requests: Sequence[EditRequest]) -> EditResult:
        """``apply`` for editors whose ``compute`` only reads the weights (KN, MEND).

        The deltas are computed first, so only the parameters they change are snapshotted (not
        every candidate layer, which would copy gigabytes on GPT-2 XL for KN's all-layer search).
        """
        requests = check_requests(requests)
        self.config.validate(loaded.adapter.n_layers)
        started = time.time()
        deltas, infos = self.compute(loaded, requests)
        originals = snapshot(loaded.model, deltas.names())
        try:
            add_in_place(loaded.model, deltas)
        except BaseException:
            restore(loaded.model, originals)
            raise
        return EditResult(loaded.model, deltas, originals, infos, time.time() - started)

    @abstractmethod
    def compute(self, loaded: LoadedModel, requests: list[EditRequest]) -> tuple[WeightDeltas, list[dict[str, Any]]]:
        """The deltas of ``requests`` (may change the weights meanwhile; ``apply`` restores them)."""

    def contexts(self, loaded: LoadedModel) -> list[str]:
        return context_templates(loaded, self.config.context_template_lengths, self.config.context_prompts,
                                 self.config.context_seed, cache_dir=self.cache_dir)
