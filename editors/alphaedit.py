"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected on the null space of the preserved keys.

Targets z (at the last edited layer) and keys K [request d_mlp] are MEMIT's (``values``, ``keys``;
the authors' ``compute_z``/``compute_ks`` are MEMIT's files). Per layer, with R the remaining
residual's equal share (as MEMIT) and P the projection on the eigenvectors of the keys' second
moment C = E[k k^T] whose eigenvalue is below ``nullspace_threshold`` (absolute, as the authors'
``get_project``: ``S < threshold`` of the SVD of C), the update is (authors' convention: keys as
columns; theirs is solved in float32, ours in float64)::

    Delta^T = (P (K^T K + K_p^T K_p) + l2 I)^-1 P K^T R       # [d_mlp d_model]
    i.e. Delta = R^T K P (K^T K P + K_p^T K_p P + l2 I)^-1    # the paper's equation, l2 = their "L2"

Delta^T lies in P's range (l2 Delta^T = P (K^T R - (K^T K + K_p^T K_p) Delta^T)), so Delta = Delta P
and Delta k = 0 for every k outside the null space: the key directions in which the preserved
knowledge (the statistics' tokens) has second moment >= threshold are not touched. K_p^T K_p is the running sum
of the outer products of the keys of the edits in force (the authors' ``cache_c``): it penalises
(P-projected) changes at those keys, so a later batch barely moves an earlier one. The editor keeps it per model object across ``apply`` calls and adds a batch's keys
when the batch is applied; restoring that edit (leaving its ``with`` block, ``EditResult.restore``)
removes them again, and ``reset()`` forgets all. A pipeline that restores every edit (the edit
stage) thus edits each group against the unedited model, as MEMIT; one that keeps its edits
(sequential editing) accumulates. The authors add K K^T with the keys recomputed after all layers
are edited; a layer's key only depends on the layers below it, which are edited by then in both,
so the keys of the layer loop are the same keys.

Against jianghoucheng/AlphaEdit f5248d3 (AlphaEdit_main.py, experiments/evaluate.py get_project):
same threshold semantics (absolute, ``S < threshold`` of C's singular values = eigenvalues, C the
uncentred E[k k^T] as ROME's layer_stats), same normal equations and L2 term, same residual
spreading and z/keys (their compute_z/compute_ks are MEMIT's). Deliberate differences: float64
eigh and solve (theirs: float32 SVD on CPU, float32 solve on GPU); K_p is tied to the edits in
force (theirs is never reset: their evaluation never restores weights); their unused
``mom2_update_weight`` is not a field.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from einops import einsum
from torch import Tensor, nn

from core.errors import ConfigError
from editors.base import EditResult
from editors.config import AlphaEditConfig
from editors.deltas import WeightDeltas
from editors.memit import Memit
from editors.requests import EditRequest
from models.load import LoadedModel

log = logging.getLogger(__name__)


def null_space_projection(moment: Tensor, threshold: float) -> Tensor:
    """``[d d]`` P = U_0 U_0^T over the eigenvectors of ``moment`` with eigenvalue < ``threshold`` (float64)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(moment.double())
    small = eigenvectors[:, eigenvalues < threshold]  # [d kept]
    return small @ small.T


def projected_update(keys: Tensor, residual: Tensor, projection: Tensor, preserved: Tensor | None, l2: float) -> Tensor:
    """``[d_model d_mlp]`` Delta = R^T K P (K^T K P + K_p^T K_p P + l2 I)^-1 in float64 (the authors' solve, transposed).

    keys: [request d_mlp]; residual: [request d_model]; projection: [d_mlp d_mlp]; preserved: K_p^T K_p or None.
    """
    keys, residual, projection = keys.double(), residual.double(), projection.double()
    gram = keys.T @ keys  # [d_mlp d_mlp]
    if preserved is not None:
        gram = gram + preserved.double()
    system = projection @ gram + l2 * torch.eye(len(gram), dtype=torch.float64, device=gram.device)
    solved = torch.linalg.solve(system, projection @ keys.T @ residual)  # [d_mlp d_model]
    return solved.T


class AlphaEdit(Memit):
    """MEMIT's z, keys and layer loop (``Memit.compute``) with the projected update per layer."""

    name = "alphaedit"
    config: AlphaEditConfig

    def __init__(self, config: AlphaEditConfig, cache_dir=None, data_dir=None) -> None:
        super().__init__(config, cache_dir, data_dir)
        self._projections: dict[tuple[str, int], Tensor] = {}
        # model -> {layer: K_p^T K_p of the edits in force} (weak: a dropped model drops its state)
        self._preserved: weakref.WeakKeyDictionary[nn.Module, dict[int, Tensor]] = weakref.WeakKeyDictionary()
        self._added: dict[int, Tensor] = {}

    def reset(self) -> None:
        """Forget the keys of earlier edits (for every model); the null-space projections are kept."""
        self._preserved.clear()

    def preserved(self, loaded: LoadedModel) -> dict[int, Tensor]:
        """``{layer: K_p^T K_p}`` of the edits applied through this editor and still in force."""
        return dict(self._preserved.get(loaded.model, {}))

    def null_space(self, loaded: LoadedModel, layer: int, moment: Tensor | None = None) -> Tensor:
        """P of the layer (float64), computed once per editor and model (from ``moment``, else the cached statistics)."""
        key = (repr(sorted(loaded.identity.items())), layer)
        if key not in self._projections:
            if moment is None:
                moment = self.moments(loaded, [layer])[layer]
            projection = null_space_projection(moment, self.config.nullspace_threshold)
            rank = int(torch.linalg.matrix_rank(projection)) if projection.abs().sum() > 0 else 0
            if rank == 0:
                smallest = float(torch.linalg.eigvalsh(moment.double())[0])
                raise ConfigError("editor.nullspace_threshold", self.config.nullspace_threshold,
                                  f"no eigenvalue of layer {layer}'s key second moment is below it (the smallest is {smallest:.3g})",
                                  "raise it above the smallest eigenvalue (the authors' 2e-2 is absolute, for their models' keys)")
            log.info("alphaedit layer %d: null space of %d of %d key directions", layer, rank, len(projection))
            self._projections[key] = projection
        return self._projections[key]

    def apply(self, loaded: LoadedModel, requests) -> EditResult:
        """``Editor.apply``; on success the batch's keys join K_p until the result is restored."""
        before = self._preserved.get(loaded.model)
        self._added = {}
        result = super().apply(loaded, requests)
        now = dict(before or {})
        for layer, gram in self._added.items():
            now[layer] = now[layer] + gram if layer in now else gram
        self._preserved[loaded.model] = now
        model = loaded.model

        def forget() -> None:
            if before is None:
                self._preserved.pop(model, None)
            else:
                self._preserved[model] = before

        result.on_restore.append(forget)
        return result

    def compute(self, loaded: LoadedModel, requests: list[EditRequest]) -> tuple[WeightDeltas, list[dict[str, Any]]]:
        self._added = {}
        return super().compute(loaded, requests)

    def layer_update(self, loaded: LoadedModel, layer: int, keys: Tensor, residual: Tensor, moment: Tensor) -> Tensor:
        """The projected update; the layer's keys are kept to join K_p once the batch is applied."""
        update = projected_update(keys, residual, self.null_space(loaded, layer, moment), self.preserved(loaded).get(layer),
                                  self.config.l2)
        self._added[layer] = einsum(keys.double(), keys.double(), "request i, request j -> i j")
        return update
