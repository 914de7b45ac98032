"""FlashAttention-2: exact attention without the [s, s] score matrix, forward and backward, and
the blocks of it ring attention merges (the row log-sum-exp out and in).

Layout is SDPA's: q [b, nh, s, d], k/v [b, nkv, s, d], nh % nkv == 0 (GQA: query head h
reads kv head h // (nh // nkv)). The Triton programs and how they compute are in
`_flash_attention_kernels.py`; this module picks their tiles, launches them, and dispatches
each op to them or to its reference (`megatron_lite.kernels.use_triton`).
"""
import math
from typing import Optional

import torch
import triton

from megatron_lite.kernels import use_triton
from megatron_lite.kernels._flash_attention_kernels import (
    _bwd_delta_kernel,
    _bwd_dkdv_kernel,
    _bwd_dq_kernel,
    _fwd_kernel,
)
from megatron_lite.kernels.reference import (
    attention_backward_reference,
    attention_forward_reference,
    flash_attention_reference,
)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
HEAD_DIMS = (16, 32, 64, 128)
DELTA_BLOCK = 64  # rows per program of the rowsum(dO * O) kernel


# (forward, dK/dV, dQ) tiles on a GPU for bf16/fp16, per head dim: the largest that compile
# for sm_90 without register spills. Forward needs BLOCK_M % BLOCK_N == 0, dK/dV the reverse.
_GPU_CONFIGS = {
    64: (dict(BLOCK_M=128, BLOCK_N=64, num_warps=8), dict(BLOCK_M=32, BLOCK_N=64, num_warps=4),
         dict(BLOCK_M=64, BLOCK_N=32, num_warps=8)),
    128: (dict(BLOCK_M=128, BLOCK_N=64, num_warps=8), dict(BLOCK_M=32, BLOCK_N=32, num_warps=8),
          dict(BLOCK_M=64, BLOCK_N=32, num_warps=8)),
}
# Document masking's dK/dV walk three query ranges (diagonal, unmasked, a document's start): at
# head dim 64 its 4 warps spill; 8 warps on the same tiles do not (tests/test_kernels_compile.py).
_GPU_DOCUMENTS_DKDV = {64: dict(BLOCK_M=32, BLOCK_N=64, num_warps=8)}
# fp32 on a GPU (TF32 dots) is a correctness path: tiles small enough for shared memory.
_GPU_FP32_CONFIG = (dict(BLOCK_M=64, BLOCK_N=32, num_warps=4), dict(BLOCK_M=32, BLOCK_N=32, num_warps=4),
                    dict(BLOCK_M=32, BLOCK_N=32, num_warps=4))


def _configs(head_dim: int, dtype: torch.dtype, device: torch.device, documents: bool = False) -> tuple[dict, ...]:
    """Fixed launch configs, no autotuning, so that the interpreter runs the very code a GPU
    runs; there it gets 16 x 16 tiles so that short test sequences still span several."""
    if device.type != "cuda":
        return (dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),) * 3
    if dtype == torch.float32:
        return tuple(dict(c, num_stages=2) for c in _GPU_FP32_CONFIG)
    fwd, dkdv, dq = _GPU_CONFIGS[max(head_dim, 64)]
    if documents:
        dkdv = _GPU_DOCUMENTS_DKDV.get(max(head_dim, 64), dkdv)
    return tuple(dict(c, num_stages=3) for c in (fwd, dkdv, dq))


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, seq) strides; the head dim must be contiguous."""
    assert t.stride(3) == 1
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _window_args(causal: bool, window: Optional[int]) -> tuple[int, bool]:
    """(window, WINDOWED) kernel arguments; a window is causal attention's."""
    if window is not None and not causal:
        raise ValueError("a sliding window is for causal attention")
    return (0, False) if window is None else (window, True)


def _doc_args(q: torch.Tensor, doc_start: Optional[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """(DOC, DOCUMENTS) kernel arguments: each row's first visible key as int32 [b, s] (q stands in,
    unread, without documents)."""
    if doc_start is None:
        return q, False
    if doc_start.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"doc_start must be [batch, seq] = [{q.shape[0]}, {q.shape[2]}], got {tuple(doc_start.shape)}")
    return doc_start.to(torch.int32).contiguous(), True


def _key_ends(doc: torch.Tensor) -> torch.Tensor:
    """Per key, the first query row whose document starts after it (rows from there on never
    see it): a search in the rows' non-decreasing document starts, int32 [b, s]."""
    keys = torch.arange(doc.shape[1], device=doc.device, dtype=doc.dtype).expand_as(doc).contiguous()
    return torch.searchsorted(doc, keys, right=True).to(torch.int32)


def _triton_forward(q, k, v, causal: bool, softmax_scale: float, window: Optional[int] = None,
                    doc_start: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, base-2 lse) from the forward kernel."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    batch, n_heads, seqlen, head_dim = q.shape
    fwd, _, _ = _configs(head_dim, q.dtype, q.device)
    o = torch.empty_like(q)  # same layout as q, so a [b, s, nh, d] caller gets one back
    lse = torch.empty((batch, n_heads, seqlen), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(seqlen, fwd["BLOCK_M"]), batch * n_heads)
    window, windowed = _window_args(causal, window)
    doc, documents = _doc_args(q, doc_start)
    _fwd_kernel[grid](
        q, k, v, o, lse, doc, softmax_scale * LOG2E, seqlen, n_heads, n_heads // k.shape[1], window,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        CAUSAL=causal, WINDOWED=windowed, DOCUMENTS=documents, HEAD_DIM=head_dim, **fwd,
    )
    return o, lse


def _triton_backward(q, k, v, o, lse, do, causal: bool, softmax_scale: float, window: Optional[int] = None,
                     doc_start: Optional[torch.Tensor] = None):
    """dq, dk, dv from the backward kernels, given the base-2 lse."""
    q, k, v, o, do = (_unit_last_stride(t) for t in (q, k, v, o, do))
    batch, n_heads, seqlen, head_dim = q.shape
    n_kv_heads = k.shape[1]
    group = n_heads // n_kv_heads
    window, windowed = _window_args(causal, window)
    doc, documents = _doc_args(q, doc_start)
    _, dkdv, dqc = _configs(head_dim, q.dtype, q.device, documents)
    qk_scale = softmax_scale * LOG2E
    key_end = _key_ends(doc) if documents else doc
    delta = torch.empty_like(lse)
    _bwd_delta_kernel[(triton.cdiv(seqlen, DELTA_BLOCK), batch * n_heads)](
        o, do, delta, seqlen, n_heads, *_strides(o), *_strides(do),
        HEAD_DIM=head_dim, BLOCK_M=DELTA_BLOCK,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _bwd_dkdv_kernel[(triton.cdiv(seqlen, dkdv["BLOCK_N"]), batch * n_kv_heads)](
        q, k, v, do, dk, dv, lse, delta, doc, key_end, qk_scale, softmax_scale, seqlen, n_heads, n_kv_heads,
        group, window, *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        CAUSAL=causal, WINDOWED=windowed, DOCUMENTS=documents, HEAD_DIM=head_dim, **dkdv,
    )
    _bwd_dq_kernel[(triton.cdiv(seqlen, dqc["BLOCK_M"]), batch * n_heads)](
        q, k, v, do, dq, lse, delta, doc, qk_scale, softmax_scale, seqlen, n_heads, group, window,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        CAUSAL=causal, WINDOWED=windowed, DOCUMENTS=documents, HEAD_DIM=head_dim, **dqc,
    )
    return dq, dk, dv


def _scale(q: torch.Tensor, softmax_scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                            softmax_scale: Optional[float] = None, window: Optional[int] = None,
                            offset: int = 0, doc_start: Optional[torch.Tensor] = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and each row's natural-log logsumexp (fp32 [b, nh, s]), without autograd: the
    block step of ring attention, which merges blocks by their lse (megatron_lite/context_parallel).
    `window`, `offset` and `doc_start` (in this block's key positions) as in
    reference.visible_keys; the kernel has no offset, so a windowed block off the diagonal runs
    the reference."""
    if not use_triton(q) or (window is not None and offset):
        return attention_forward_reference(q, k, v, causal, softmax_scale, window, offset, doc_start)
    o, lse2 = _triton_forward(q, k, v, causal, _scale(q, softmax_scale), window, doc_start)
    return o, lse2 * LN2


def flash_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, dout: torch.Tensor, causal: bool,
                             softmax_scale: Optional[float] = None, window: Optional[int] = None,
                             offset: int = 0, doc_start: Optional[torch.Tensor] = None):
    """dq, dk, dv of one key block given the merged output and natural-log lse of the whole attention."""
    if not use_triton(q) or (window is not None and offset):
        return attention_backward_reference(q, k, v, out, lse, dout, causal, softmax_scale, window, offset,
                                            doc_start)
    return _triton_backward(q, k, v, out, (lse * LOG2E).contiguous(), dout, causal, _scale(q, softmax_scale),
                            window, doc_start)


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, window, doc_start):
        o, lse = _triton_forward(q, k, v, causal, softmax_scale, window, doc_start)
        ctx.save_for_backward(_unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v), o, lse)
        ctx.causal, ctx.softmax_scale, ctx.window, ctx.doc_start = causal, softmax_scale, window, doc_start
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        grads = _triton_backward(q, k, v, o, lse, do, ctx.causal, ctx.softmax_scale, ctx.window, ctx.doc_start)
        return (*grads, None, None, None, None)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
    softmax_scale: Optional[float] = None, window: Optional[int] = None,
    doc_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of q [b, nh, s, d] over k, v [b, nkv, s, d] (GQA when nkv < nh), scaled by
    `softmax_scale` (default 1/sqrt(d)); with `window` (causal), each query sees itself and
    the `window` keys before it; with `doc_start` [b, s] (causal, document masking), each query
    sees no key before doc_start[b, i], the start of its document (non-decreasing along s: the
    key blocks of earlier documents are skipped). Returns [b, nh, s, d] in q's dtype."""
    b, nh, s, d = q.shape
    if k.shape != v.shape or (k.shape[0], k.shape[2], k.shape[3]) != (b, s, d) or nh % k.shape[1]:
        raise ValueError(
            f"need q [b, nh, s, d] and k, v [b, nkv, s, d] with nh % nkv == 0; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not use_triton(q):
        return flash_attention_reference(q, k, v, causal, softmax_scale, window=window, doc_start=doc_start)
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[-1]} not supported; use one of {HEAD_DIMS}")
    return FlashAttentionFunction.apply(q, k, v, causal, _scale(q, softmax_scale), window, doc_start)
