"""The two normalisations of the model families, computed in fp32 whatever the input dtype.

Both take an optional `residual` and then return (norm(x + residual), x + residual): the
pre-norm block's residual add and the norm after it are one op, which the fused kernels
do in one pass over the row.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.tensor_parallel import mark_sequence_parallel

if TYPE_CHECKING:
    from megatron_lite.model.ops import Ops

NormOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> NormOutput:
    """Llama's norm: x / rms(x) * weight, no mean subtraction and no bias."""
    if residual is not None:
        h = x + residual
        return rms_norm(h, weight, eps), h
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               residual: torch.Tensor | None = None) -> NormOutput:
    """GPT-2's norm: (x - mean) / std * weight + bias."""
    if residual is not None:
        h = x + residual
        return layer_norm(h, weight, bias, eps), h
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


class RMSNorm(nn.Module):
    """Holds the weight; `norm` is `rms_norm` above or the fused kernel."""

    def __init__(self, hidden_size: int, eps: float, norm: Callable[..., NormOutput]) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.norm = norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> NormOutput:
        return self.norm(x, self.weight, self.eps, residual)


class LayerNorm(nn.Module):
    """Holds the weight and bias; `norm` is `layer_norm` above or the fused kernel."""

    def __init__(self, hidden_size: int, eps: float, norm: Callable[..., NormOutput]) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.norm = norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> NormOutput:
        return self.norm(x, self.weight, self.bias, self.eps, residual)


def build_norm(config: ModelConfig, ops: Ops, sequence_parallel: bool = False) -> nn.Module:
    """The family's norm, computed by `ops`. Under sequence parallelism it sees only this
    rank's tokens, so its params are flagged for the tp all-reduce of their grads."""
    if config.family == "llama":
        norm = RMSNorm(config.hidden_size, config.norm_epsilon, ops.rms_norm)
    else:
        norm = LayerNorm(config.hidden_size, config.norm_epsilon, ops.layer_norm)
    mark_sequence_parallel(norm, sequence_parallel)
    return norm
