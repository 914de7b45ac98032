"""Muon (--optimizer muon): momentum SGD whose update of each weight matrix is orthogonalised by a
Newton-Schulz iteration, with AdamW for what is not a hidden-layer matrix (Megatron-Core's
--optimizer muon, flag names and meanings as its arguments.py; docs/optimizers.md).

Per matrix W with gradient G, momentum beta (--muon-momentum), lr, weight decay wd:
    M <- beta M + (1 - beta) G                       (the momentum buffer, the only state)
    U  = (1 - beta) G + beta M  with --muon-use-nesterov, else M
    O  = NS(U) * scale(rows, cols) * --muon-extra-scale-factor
    W <- W (1 - lr wd) - lr O
NS(U) approximates U V^T of U's SVD: U is divided by its Frobenius norm, transposed to be wide,
and iterated X <- a X + (b A + c A A) X with A = X X^T, (a, b, c) per step from
--muon-coefficient-type. The scale (--muon-scale-mode) makes update sizes comparable across
shapes: spectral sqrt(max(rows, cols)), unit_rms_norm sqrt(rows / cols), shape_scaling
sqrt(max(1, rows / cols)).

NS is not elementwise: it must see the whole logical matrix. This module orthogonalises a
parameter's full local tensor (optimizer.py's LocalOptimizer brings it whole: gathered over tp,
and over the data-parallel shards of the distributed optimizer), one logical matrix at a time:
the query, key and value blocks of a fused QKV weight separately (unless --muon-no-split-qkv),
SwiGLU's gate and up halves of fc1 separately, each expert separately. The NS runs in fp32.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.adamw import adamw

from megatron_lite.config import MUON_COEFFICIENTS

NS_EPS = 1e-7  # keeps the normalisation finite for an all-zero update


def newton_schulz(update: torch.Tensor, steps: int, coefficient_type: str) -> torch.Tensor:
    """The orthogonalised (approximately U V^T) fp32 matrix of a 2-D `update`."""
    x = update.float()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x  # iterate on the wide side: the Gram matrix is the smaller one
    x = x / (x.norm() + NS_EPS)
    sets = MUON_COEFFICIENTS[coefficient_type]
    for i in range(steps):
        a, b, c = sets[i % len(sets)]
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def scale_factor(rows: int, cols: int, mode: str) -> float:
    """The factor an orthogonalised rows x cols update is multiplied by (module docstring)."""
    if mode == "spectral":
        return math.sqrt(max(rows, cols))
    if mode == "unit_rms_norm":
        return math.sqrt(rows / cols)
    return math.sqrt(max(1.0, rows / cols))


@dataclass(frozen=True)
class RowBlocks:
    """How a weight's rows are several logical matrices: the rows are `groups` repeats of blocks of
    `sizes` rows, and block i of every repeat together is matrix i (a fused QKV: per query group,
    the group's query heads, its key, its value; SwiGLU's fc1: one repeat of [gate; up])."""
    groups: int
    sizes: tuple[int, ...]
    qkv: bool = False  # --muon-no-split-qkv orthogonalises it whole


def mark_row_blocks(param: nn.Parameter, groups: int, sizes: tuple[int, ...], qkv: bool = False) -> None:
    """Record, on the layer's weight, the logical matrices its full (unsharded) rows hold."""
    param.row_blocks = RowBlocks(groups, sizes, qkv)


def uses_muon(param: nn.Parameter) -> bool:
    """Whether Muon updates the parameter: a matrix (or stacked experts' matrices) that is not the
    embedding or output layer (Megatron's rule); the rest (those, norms, biases) go to AdamW."""
    return param.ndim >= 2 and not getattr(param, "is_embedding_or_output_parameter", False)


@dataclass(frozen=True)
class MuonSettings:
    momentum: float
    nesterov: bool
    num_ns_steps: int
    coefficient_type: str
    scale_mode: str
    extra_scale_factor: float
    split_qkv: bool


def _orthogonalize_matrix(matrix: torch.Tensor, blocks: RowBlocks | None, s: MuonSettings) -> torch.Tensor:
    """One 2-D full weight's scaled, orthogonalised update, block by block."""
    out = torch.empty_like(matrix, dtype=torch.float32)
    if blocks is None or (blocks.qkv and not s.split_qkv):
        blocks = RowBlocks(1, (matrix.shape[0],))
    cols, start = matrix.shape[1], 0
    grouped, target = matrix.view(blocks.groups, -1, cols), out.view(blocks.groups, -1, cols)
    for size in blocks.sizes:
        block = grouped[:, start:start + size].reshape(-1, cols)
        scale = scale_factor(block.shape[0], cols, s.scale_mode) * s.extra_scale_factor
        target[:, start:start + size] = (newton_schulz(block, s.num_ns_steps, s.coefficient_type)
                                         * scale).view(blocks.groups, size, cols)
        start += size
    return out


def orthogonalize(param: nn.Parameter, full: torch.Tensor, settings: MuonSettings) -> torch.Tensor:
    """The scaled, orthogonalised update of `param` from its full momentum update `full` (its
    shape: the unsharded matrix, or this rank's stacked experts, each expert a matrix of its own)."""
    blocks = getattr(param, "row_blocks", None)
    if full.ndim == 2:
        return _orthogonalize_matrix(full, blocks, settings)
    return torch.stack([_orthogonalize_matrix(m, blocks, settings) for m in full.flatten(0, -3)]).view_as(full)


class Muon(torch.optim.Optimizer):
    """Muon over the groups marked {"muon": True}, AdamW (torch's own update) over the others.

    `orthogonalized(params, updates)` turns each Muon tensor's momentum update into its
    orthogonalised one: the caller knows how its tensors are pieces of full matrices (a
    collective, run by every rank of the groups the matrices are split over). State per tensor:
    "step" and "momentum_buffer" (Muon) or torch AdamW's "step", "exp_avg", "exp_avg_sq", so
    checkpoints save, load and reshard it as they do AdamW's.
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                 settings: MuonSettings,
                 orthogonalized: Callable[[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]]) -> None:
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, muon=False))
        self.settings = settings
        self.orthogonalized = orthogonalized

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                self._state(p, group["muon"])
            if group["muon"]:
                self._muon_step(group, params)
            else:
                self._adam_step(group, params)

    def _state(self, p: torch.Tensor, muon: bool) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            if muon:
                state["momentum_buffer"] = torch.zeros_like(p)
            else:
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        return state

    def _adam_step(self, group: dict, params: list[torch.Tensor]) -> None:
        # torch's single-tensor AdamW: the same update as torch.optim.AdamW(foreach=False).
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
              [s["step"] for s in states], foreach=False, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    def _muon_step(self, group: dict, params: list[torch.Tensor]) -> None:
        beta = self.settings.momentum
        updates = []
        for p in params:
            self.state[p]["step"] += 1  # (AdamW's functional update counts its own)
            momentum = self.state[p]["momentum_buffer"]
            momentum.lerp_(p.grad, 1 - beta)
            updates.append(p.grad.lerp(momentum, beta) if self.settings.nesterov else momentum)
        for p, update in zip(params, self.orthogonalized(params, updates)):
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-group["lr"])
