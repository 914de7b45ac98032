"""The two normalisations of the model families, computed in fp32 whatever the input dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.tensor_parallel import mark_sequence_parallel


class RMSNorm(nn.Module):
    """Llama's norm: x / rms(x) * weight, no mean subtraction and no bias."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class LayerNorm(nn.Module):
    """GPT-2's norm: (x - mean) / std * weight + bias."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


def build_norm(family: str, hidden_size: int, eps: float, sequence_parallel: bool = False) -> nn.Module:
    """The family's norm. Under sequence parallelism it sees only this rank's tokens, so its
    params are flagged for the tp all-reduce of their grads."""
    norm = RMSNorm(hidden_size, eps) if family == "llama" else LayerNorm(hidden_size, eps)
    mark_sequence_parallel(norm, sequence_parallel)
    return norm
