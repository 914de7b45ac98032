"""LayerNorm with a fused residual add: y = (h - mean) / std * w + b, h = x + residual.

The kernels live in `_norm.py`, shared with RMSNorm (`CENTERED=True` here).
"""
from typing import Optional

import torch

from megatron_lite.kernels import use_triton
from megatron_lite.kernels._norm import RowNormFunction
from megatron_lite.kernels.reference import NormOutput, layer_norm_reference


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    eps: float,
    residual: Optional[torch.Tensor] = None,
) -> NormOutput:
    """LayerNorm over the last dim of x (`bias` may be None). With `residual`, returns
    (y, h) where h = x + residual is the new residual stream and y = layernorm(h)."""
    if not use_triton(x):
        return layer_norm_reference(x, weight, bias, eps, residual)
    return RowNormFunction.apply(x, weight, bias, residual, eps, True)
