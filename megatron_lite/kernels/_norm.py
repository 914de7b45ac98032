"""Row normalisation shared by `rms_norm` and `layer_norm`: Triton kernels and autograd.

The two ops differ only in whether the row is centred (LayerNorm subtracts the mean and
adds a bias; RMSNorm does neither), so one pair of kernels serves both, specialised by
the `CENTERED` / `HAS_BIAS` constexprs. Both fuse the pre-norm residual add:
h = x + residual is written out (it is the next residual stream) and normalised.

Statistics are taken in fp32 whatever the storage dtype: a bf16 sum of 4096 squares
keeps only 8 mantissa bits. The weight (and bias) gradient is a sum over every row;
each program accumulates its rows in fp32 registers, writes one partial row, and torch
sums the [programs, cols] partials, so no atomics and a deterministic result.
"""
import torch
import triton
import triton.language as tl

from megatron_lite.kernels._common import as_rows, persistent_programs, ptr_add, row_block


@triton.jit
def _norm_fwd_kernel(
    X, R, W, B, Y, H, Mean, Rstd,
    stride_x, stride_r, stride_y, stride_h, n_cols, eps,
    CENTERED: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    h = tl.load(ptr_add(X, row, stride_x) + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(ptr_add(R, row, stride_r) + cols, mask=mask, other=0.0).to(tl.float32)
        h_stored = h.to(H.dtype.element_ty)
        tl.store(ptr_add(H, row, stride_h) + cols, h_stored, mask=mask)
        # Normalise the rounded h, the value backward will reload, as torch would.
        h = h_stored.to(tl.float32)
    if CENTERED:
        mean = tl.sum(h, axis=0) / n_cols
        tl.store(Mean + row, mean)
        h = tl.where(mask, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    tl.store(Rstd + row, rstd)
    y = h * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr_add(Y, row, stride_y) + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    DY, H, DH_OUT, W, Mean, Rstd, DH, DW_PARTIAL, DB_PARTIAL,
    stride_dy, stride_h, stride_dho, stride_dh, n_rows, n_cols,
    CENTERED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DH_OUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # With xhat = (h - mean) * rstd and y = w * xhat + b, the input gradient is
    #   dh = rstd * (w*dy - xhat * mean(xhat * w*dy) - mean(w*dy))
    # (RMSNorm: no mean(w*dy) term, since nothing was subtracted). Masked lanes load
    # dy = w = 0, so they add nothing to the row sums.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(pid, n_rows, tl.num_programs(0)):
        h = tl.load(ptr_add(H, row, stride_h) + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(ptr_add(DY, row, stride_dy) + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        if CENTERED:
            xhat = (h - tl.load(Mean + row)) * rstd
        else:
            xhat = h * rstd
        wdy = w * dy
        dh = wdy - xhat * (tl.sum(xhat * wdy, axis=0) / n_cols)
        if CENTERED:
            dh -= tl.sum(wdy, axis=0) / n_cols
        dh *= rstd
        if HAS_DH_OUT:
            # h was also an output (the residual stream): its own gradient adds here.
            dh += tl.load(ptr_add(DH_OUT, row, stride_dho) + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptr_add(DH, row, stride_dh) + cols, dh.to(DH.dtype.element_ty), mask=mask)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
    tl.store(ptr_add(DW_PARTIAL, pid, n_cols) + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(ptr_add(DB_PARTIAL, pid, n_cols) + cols, db, mask=mask)


class RowNormFunction(torch.autograd.Function):
    """y = norm(x [+ residual]) over the last dim; returns y, or (y, h) with a residual."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, centered):
        x2 = as_rows(x)
        n_rows, n_cols = x2.shape
        block, num_warps = row_block(n_cols)
        y = torch.empty_like(x2, memory_format=torch.contiguous_format)
        h = x2 if residual is None else torch.empty_like(y)
        r2 = None if residual is None else as_rows(residual)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        mean = torch.empty_like(rstd) if centered else None
        _norm_fwd_kernel[(n_rows,)](
            x2, r2, weight, bias, y, h, mean, rstd,
            x2.stride(0), 0 if r2 is None else r2.stride(0), y.stride(0), h.stride(0), n_cols, eps,
            CENTERED=centered, HAS_RESIDUAL=r2 is not None, HAS_BIAS=bias is not None,
            BLOCK=block, num_warps=num_warps,
        )
        ctx.save_for_backward(h, weight, bias, mean, rstd)
        ctx.centered = centered
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.x_shape = x.shape
        # An unused h output should cost nothing in backward: no zero-filled gradient.
        ctx.set_materialize_grads(False)
        if residual is None:
            return y.view(x.shape)
        return y.view(x.shape), h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        h, weight, bias, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = h.shape
        block, num_warps = row_block(n_cols)
        dy = torch.zeros_like(h) if dy is None else as_rows(dy)
        dh_out = None if dh_out is None else as_rows(dh_out)
        dh = torch.empty_like(h, memory_format=torch.contiguous_format)
        n_prog = persistent_programs(n_rows, h.device)
        dw_partial = torch.empty((n_prog, n_cols), dtype=torch.float32, device=h.device)
        db_partial = None if bias is None else torch.empty_like(dw_partial)
        _norm_bwd_kernel[(n_prog,)](
            dy, h, dh_out, weight, mean, rstd, dh, dw_partial, db_partial,
            dy.stride(0), h.stride(0), 0 if dh_out is None else dh_out.stride(0), dh.stride(0),
            n_rows, n_cols,
            CENTERED=ctx.centered, HAS_BIAS=bias is not None, HAS_DH_OUT=dh_out is not None,
            BLOCK=block, num_warps=num_warps,
        )
        dw = dw_partial.sum(0).to(weight.dtype)
        db = None if bias is None else db_partial.sum(0).to(bias.dtype)
        dx = dh.view(ctx.x_shape)
        dres = None if ctx.residual_dtype is None else dx.to(ctx.residual_dtype)
        return dx, dw, db, dres, None, None

