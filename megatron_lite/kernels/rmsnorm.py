"""RMSNorm with a fused residual add (Llama pre-norm): y = h / rms(h) * w, h = x + residual.

The kernels live in `_norm.py`, shared with LayerNorm (`CENTERED=False` here).
"""
from typing import Optional

import torch

from megatron_lite.kernels import use_triton
from megatron_lite.kernels._norm import RowNormFunction
from megatron_lite.kernels.reference import NormOutput, rms_norm_reference


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
) -> NormOutput:
    """RMSNorm over the last dim of x. With `residual`, returns (y, h) where h = x + residual
    is the new residual stream and y = rmsnorm(h); otherwise returns y."""
    if not use_triton(x):
        return rms_norm_reference(x, weight, eps, residual)
    return RowNormFunction.apply(x, weight, None, residual, eps, False)
