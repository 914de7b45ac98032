"""GELU, tanh approximation (GPT-2's gelu_new):
    gelu(x) = 0.5 x (1 + tanh(u)),   u = sqrt(2/pi) (x + 0.044715 x^3),
    gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2),  t = tanh(u).

Elementwise over the flattened tensor. tanh is written with exp (the interpreter has no
libdevice), as sign(u) (1 - e) / (1 + e) with e = exp(-2|u|) <= 1: it never overflows and
saturates to +-1 for large |u|.
"""
import math

import torch
import triton
import triton.language as tl

from megatron_lite.kernels import use_triton
from megatron_lite.kernels.reference import gelu_reference

BLOCK = 1024
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
COEFF = 0.044715


@triton.jit
def _tanh(u):
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u >= 0, t, -t)


@triton.jit
def _offsets(n, BLOCK: tl.constexpr):
    # int64: a flattened activation of b*s*4h elements can pass 2**31.
    offs = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def _gelu_fwd_kernel(X, Y, n, SQRT_2_OVER_PI: tl.constexpr, COEFF: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(SQRT_2_OVER_PI * (x + COEFF * x * x * x))
    tl.store(Y + offs, (0.5 * x * (1.0 + t)).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(X, DY, DX, n, SQRT_2_OVER_PI: tl.constexpr, COEFF: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(SQRT_2_OVER_PI * (x + COEFF * x * x * x))
    du_dx = SQRT_2_OVER_PI * (1.0 + 3.0 * COEFF * x * x)
    dx = dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


class GeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        y = torch.empty_like(x)
        grid = (triton.cdiv(x.numel(), BLOCK),)
        _gelu_fwd_kernel[grid](x, y, x.numel(), SQRT_2_OVER_PI, COEFF, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        grid = (triton.cdiv(x.numel(), BLOCK),)
        _gelu_bwd_kernel[grid](x, dy, dx, x.numel(), SQRT_2_OVER_PI, COEFF, BLOCK=BLOCK, num_warps=4)
        return dx


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, elementwise, same shape and dtype as x."""
    if not use_triton(x):
        return gelu_reference(x)
    return GeluFunction.apply(x)
