"""SwiGLU: out = silu(a) * b with a, b = x.chunk(2, -1) (the Llama MLP gate).

Memory-bound, so the win is one read of x and one write of out instead of the three
kernels (and two intermediates) of eager torch. Backward recomputes silu(a) from the
saved x rather than saving it:
    d/da [a * sig(a) * b] = b * sig(a) * (1 + a * (1 - sig(a))),   d/db = a * sig(a).
"""
import torch
import triton
import triton.language as tl

from megatron_lite.kernels import use_triton
from megatron_lite.kernels._common import as_rows, ptr_add
from megatron_lite.kernels.reference import swiglu_reference

BLOCK = 1024


@triton.jit
def _sigmoid(a):
    # Written with e = exp(-|a|) <= 1 so it never overflows (the interpreter has no libdevice).
    e = tl.exp(-tl.abs(a))
    return tl.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _load_halves(X, stride_x, f, BLOCK: tl.constexpr):
    """This program's columns of a = x[row, :f] and b = x[row, f:], in fp32."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < f
    x = ptr_add(X, row, stride_x) + cols
    a = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x + f, mask=mask, other=0.0).to(tl.float32)
    return row, cols, mask, a, b


@triton.jit
def _swiglu_fwd_kernel(X, Y, stride_x, stride_y, f, BLOCK: tl.constexpr):
    row, cols, mask, a, b = _load_halves(X, stride_x, f, BLOCK)
    y = a * _sigmoid(a) * b
    tl.store(ptr_add(Y, row, stride_y) + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(X, DY, DX, stride_x, stride_dy, stride_dx, f, BLOCK: tl.constexpr):
    row, cols, mask, a, b = _load_halves(X, stride_x, f, BLOCK)
    dy = tl.load(ptr_add(DY, row, stride_dy) + cols, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(a)
    da = dy * b * sig * (1.0 + a * (1.0 - sig))
    db = dy * a * sig
    dx = ptr_add(DX, row, stride_dx) + cols
    tl.store(dx, da.to(DX.dtype.element_ty), mask=mask)
    tl.store(dx + f, db.to(DX.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x2 = as_rows(x)
        n_rows, f = x2.shape[0], x2.shape[1] // 2
        y = torch.empty((n_rows, f), dtype=x.dtype, device=x.device)
        grid = (n_rows, triton.cdiv(f, BLOCK))
        _swiglu_fwd_kernel[grid](x2, y, x2.stride(0), y.stride(0), f, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(x2)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], f)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        dy2 = as_rows(dy)
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        f = x2.shape[1] // 2
        grid = (x2.shape[0], triton.cdiv(f, BLOCK))
        _swiglu_bwd_kernel[grid](
            x2, dy2, dx, x2.stride(0), dy2.stride(0), dx.stride(0), f, BLOCK=BLOCK, num_warps=4
        )
        return dx.view(ctx.x_shape)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for a, b = x.chunk(2, -1); x: [..., 2f] -> [..., f]."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dim, got {x.shape[-1]}")
    if not use_triton(x):
        return swiglu_reference(x)
    return SwiGLUFunction.apply(x)
