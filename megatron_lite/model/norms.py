"""The norm modules of the two model families: each holds its weights and calls the norm of
the model's `Ops` (a kernel or its reference; fp32 statistics whatever the input dtype).

Both take an optional `residual` and then return (norm(x + residual), x + residual): the
pre-norm block's residual add and the norm after it are one op, which the fused kernels do
in one pass over the row.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.kernels.reference import NormOutput
from megatron_lite.model.ops import Ops
from megatron_lite.tensor_parallel import mark_sequence_parallel


class RMSNorm(nn.Module):
    """Holds the weight; `norm` is an `Ops.rms_norm`."""

    def __init__(self, hidden_size: int, eps: float, norm: Callable[..., NormOutput]) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.norm = norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> NormOutput:
        return self.norm(x, self.weight, self.eps, residual)


class LayerNorm(nn.Module):
    """Holds the weight and bias; `norm` is an `Ops.layer_norm`."""

    def __init__(self, hidden_size: int, eps: float, norm: Callable[..., NormOutput]) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.norm = norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> NormOutput:
        return self.norm(x, self.weight, self.bias, self.eps, residual)


def build_norm(config: ModelConfig, ops: Ops, partial_over_tp: bool = False, size: int | None = None) -> nn.Module:
    """The family's norm over the last `size` (default: hidden) features, computed by `ops`.
    `partial_over_tp`: each tp rank's copy sees part of the input (its tokens under sequence
    parallelism, its heads for the q/k norms), so its params are flagged for the tp all-reduce
    of their grads."""
    size = size or config.hidden_size
    if config.family == "llama":
        norm = RMSNorm(size, config.norm_epsilon, ops.rms_norm)
    else:
        norm = LayerNorm(size, config.norm_epsilon, ops.layer_norm)
    mark_sequence_parallel(norm, partial_over_tp)
    return norm
