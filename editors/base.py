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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

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

    def restore(self) -> None:
        if not self.restored:
            restore(self.model, self.originals)
            self.restored = True

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
        """The parameters ``compute`` may change (snapshotted by ``apply``): the layers' MLP out weights."""
        return WeightDeltas.for_mlp_out(loaded.model, loaded.adapter, {
            layer: loaded.adapter.mlp_out_matrix(loaded.model, layer) for layer in self.config.layers}).names()

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
