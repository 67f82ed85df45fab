"""MEND's gradient-transform network (Mitchell et al., 2022).

The gradient of a linear layer's weight on a sequence is a sum of rank-one terms, one per token:
dL/dW = sum_t delta_t u_t^T (u_t: the layer's input, delta_t: the gradient at its output). MEND
never builds that matrix: a small MLP maps each token's (u_t, delta_t) to (u~_t, delta~_t), and
the edit is Delta W = -lr_l * sum_t delta~_t u~_t^T with a learned step size lr_l per layer.

The MLP (one per distinct layer shape, shared by the layers of that shape) sees the
concatenation [u, delta], normalised by running statistics of the training inputs; it is a stack
of residual low-rank layers initialised to the identity (so an untrained MEND is plain gradient
descent with step lr_l), with a per-layer scale and shift of each pre-activation ("modes").

As the authors' code (kmeng01/rome ``baselines/mend``: ``GradientTransform`` with ``combine``,
``IDMLP`` of ``LRLinear``; tests/test_mend_fixtures.py): every layer, the last included, is
``x + relu(...)`` (their ``LRLinear`` ignores its ``relu`` flag), and the down projection starts as
``randn``. The one deliberate difference is the sign of the step (see ``NetworkConfig.edit_lr``).
"""

from __future__ import annotations

import torch
from einops import einsum
from torch import Tensor, nn

from editors.config import NetworkConfig


class LowRankResidual(nn.Module):
    """x + relu(((x V^T) U^T + b) * scale_mode + shift_mode); U = 0 at init (identity), V ~ N(0, 1)."""

    def __init__(self, dim: int, rank: int, n_modes: int) -> None:
        super().__init__()
        rank = min(rank, dim)
        self.down = nn.Parameter(torch.randn(rank, dim))
        self.up = nn.Parameter(torch.zeros(dim, rank))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, x: Tensor, mode: int) -> Tensor:  # x: [token dim]
        pre = (x @ self.down.T) @ self.up.T + self.bias
        pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        return x + pre.clamp(min=0)  # clamp, not relu: the gradient at 0 is not 0 (theirs)


class RunningNorm(nn.Module):
    """Per-dimension running mean/std of the training inputs (batched Welford / Chan merge)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:  # x: [token dim]
        x = x.double()
        n = x.shape[0]
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        total = self.count + n
        shift = batch_mean - self.mean
        self.mean += shift * n / total
        self.m2 += batch_m2 + shift ** 2 * self.count * n / total
        self.count.fill_(total)

    def forward(self, x: Tensor) -> Tensor:
        if self.count < 2:
            return x
        std = (self.m2 / (self.count - 1)).sqrt().to(x.dtype)
        return (x - self.mean.to(x.dtype)) / (std + 1e-7)


class GradientTransform(nn.Module):
    """(u, delta) -> (u~, delta~) for the layers of one shape ``(d_in, d_out)``."""

    def __init__(self, d_in: int, d_out: int, n_modes: int, config: NetworkConfig) -> None:
        super().__init__()
        self.d_in, self.d_out, self.use_norm = d_in, d_out, config.norm
        dim = d_in + d_out
        self.norm_u, self.norm_delta = RunningNorm(d_in), RunningNorm(d_out)
        self.layers = nn.ModuleList([LowRankResidual(dim, config.rank, n_modes)
                                     for _ in range(config.n_hidden + 1)])

    def forward(self, u: Tensor, delta: Tensor, mode: int) -> tuple[Tensor, Tensor]:  # u: [token d_in], delta: [token d_out]
        u, delta = u.float(), delta.float()
        if self.use_norm:
            if self.training:
                self.norm_u.update(u)
                self.norm_delta.update(delta)
            u, delta = self.norm_u(u), self.norm_delta(delta)
        x = torch.cat([u, delta], dim=-1)
        for layer in self.layers:
            x = layer(x, mode)
        return x[:, :self.d_in], x[:, self.d_in:]


class MendNetwork(nn.Module):
    """One ``GradientTransform`` per layer shape (or per layer) and a learned step size per layer."""

    def __init__(self, shapes: dict[int, tuple[int, int]], config: NetworkConfig) -> None:
        """``shapes``: ``{layer: (d_in, d_out)}`` of the edited projections (d_in = d_mlp, d_out = d_model)."""
        super().__init__()
        self.layers = sorted(shapes)
        self.shapes = dict(shapes)
        groups: dict[str, list[int]] = {}
        for layer in self.layers:
            key = f"{shapes[layer][0]}x{shapes[layer][1]}" if config.shared else f"layer{layer}"
            groups.setdefault(key, []).append(layer)
        self.group_of = {layer: (key, members.index(layer)) for key, members in groups.items() for layer in members}
        self.transforms = nn.ModuleDict({key: GradientTransform(*shapes[members[0]], len(members), config)
                                         for key, members in groups.items()})
        self.edit_lrs = nn.Parameter(torch.full((len(self.layers),), float(config.edit_lr)))

    def weight_update(self, layer: int, u: Tensor, delta: Tensor) -> Tensor:
        """Delta W of ``layer`` in ``[d_out d_in]`` layout.  u: [token d_in], delta: [token d_out]"""
        key, mode = self.group_of[layer]
        u_tilde, delta_tilde = self.transforms[key](u, delta, mode)
        lr = self.edit_lrs[self.layers.index(layer)]
        return -lr * einsum(delta_tilde, u_tilde, "token d_out, token d_in -> d_out d_in")

    def forward(self, factors: dict[int, tuple[Tensor, Tensor]]) -> dict[int, Tensor]:
        return {layer: self.weight_update(layer, u, delta) for layer, (u, delta) in factors.items()}
