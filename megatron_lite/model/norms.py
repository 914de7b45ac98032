"""The norm modules of the two model families: each holds its weights and calls the norm of
the model's `Ops` (a kernel or its reference; fp32 statistics whatever the input dtype).

Both take an optional `residual` and then return (norm(x + residual), x + residual): the
pre-norm block's residual add and the norm after it are one op, which the fused kernels do
in one pass over the row.

With --apply-layernorm-1p (Megatron's zero-centred gamma) a norm stores its weight minus one,
starting at zero, and scales by 1 + weight: the sum is taken in fp32, so a bf16 weight near zero
keeps its low bits, and every norm path (reference or kernel, under SP or not) sees the plain gamma.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.kernels.reference import NormOutput
from megatron_lite.model.ops import Ops
from megatron_lite.tensor_parallel import mark_sequence_parallel


class _Norm(nn.Module):
    """Holds the weight (gamma, or gamma - 1 when `zero_centered`) and the norm op."""

    def __init__(self, hidden_size: int, eps: float, norm: Callable[..., NormOutput], zero_centered: bool) -> None:
        super().__init__()
        self.eps, self.norm, self.zero_centered = eps, norm, zero_centered
        self.weight = nn.Parameter(torch.zeros(hidden_size) if zero_centered else torch.ones(hidden_size))

    def gamma(self) -> torch.Tensor:
        """The scale the norm multiplies by."""
        return self.weight.float() + 1.0 if self.zero_centered else self.weight


class RMSNorm(_Norm):
    """`norm` is an `Ops.rms_norm`."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> NormOutput:
        return self.norm(x, self.gamma(), self.eps, residual)


class LayerNorm(_Norm):
    """Also holds the bias; `norm` is an `Ops.layer_norm`."""

    def __init__(self, hidden_size: int, eps: float, norm: Callable[..., NormOutput], zero_centered: bool) -> None:
        super().__init__(hidden_size, eps, norm, zero_centered)
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> NormOutput:
        return self.norm(x, self.gamma(), self.bias, self.eps, residual)


def is_norm_weight(name: str) -> bool:
    """Whether a parameter name (ours, global or local) is a norm's weight, MTP's enorm and hnorm included."""
    return name.endswith("weight") and ("layernorm" in name or name.endswith(("enorm.weight", "hnorm.weight")))


def build_norm(config: ModelConfig, ops: Ops, partial_over_tp: bool = False, size: int | None = None) -> nn.Module:
    """The family's norm over the last `size` (default: hidden) features, computed by `ops`.
    `partial_over_tp`: each tp rank's copy sees part of the input (its tokens under sequence
    parallelism, its heads for the q/k norms), so its params are flagged for the tp all-reduce
    of their grads."""
    size = size or config.hidden_size
    if config.family == "llama":
        norm = RMSNorm(size, config.norm_epsilon, ops.rms_norm, config.apply_layernorm_1p)
    else:
        norm = LayerNorm(size, config.norm_epsilon, ops.layer_norm, config.apply_layernorm_1p)
    mark_sequence_parallel(norm, partial_over_tp)
    return norm
