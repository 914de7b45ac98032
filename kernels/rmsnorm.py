"""RMSNorm with a fused residual add (Llama pre-norm): y = h / rms(h) * w, h = x + residual.

The kernels live in `_norm.py`, shared with LayerNorm (`CENTERED=False` here).
"""
from typing import Optional, Union

import torch

from kernels import use_triton
from kernels._norm import RowNormFunction


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Plain torch, statistics in fp32."""
    h = x if residual is None else x + residual
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """RMSNorm over the last dim of x. With `residual`, returns (y, h) where h = x + residual
    is the new residual stream and y = rmsnorm(h); otherwise returns y."""
    if not use_triton(x):
        return rms_norm_reference(x, weight, eps, residual)
    return RowNormFunction.apply(x, weight, None, residual, eps, False)
