"""LayerNorm with a fused residual add: y = (h - mean) / std * w + b, h = x + residual.

The kernels live in `_norm.py`, shared with RMSNorm (`CENTERED=True` here).
"""
from typing import Optional, Union

import torch

from kernels import use_triton
from kernels._norm import RowNormFunction


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    eps: float,
    residual: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Plain torch, statistics in fp32."""
    h = x if residual is None else x + residual
    b = None if bias is None else bias.float()
    y = torch.nn.functional.layer_norm(h.float(), h.shape[-1:], weight.float(), b, eps).to(x.dtype)
    return y if residual is None else (y, h)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    eps: float,
    residual: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """LayerNorm over the last dim of x (`bias` may be None). With `residual`, returns
    (y, h) where h = x + residual is the new residual stream and y = layernorm(h)."""
    if not use_triton(x):
        return layer_norm_reference(x, weight, bias, eps, residual)
    return RowNormFunction.apply(x, weight, bias, residual, eps, True)
