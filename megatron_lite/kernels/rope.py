"""Rotary position embedding (Hugging Face Llama "rotate_half" convention) on q and k.

With x1, x2 the first and second halves of a head, and angle theta[p, i] at position p:
    out1 = x1 * cos - x2 * sin,    out2 = x2 * cos + x1 * sin,
i.e. each pair (x1[i], x2[i]) is rotated by theta[p, i]. A rotation's transpose is the
rotation by -theta, so backward is the same kernel with sin negated.

One program handles one token: it loads that position's cos/sin once and rotates every
head of q and of k (GQA: their head counts may differ), so q and k share one launch.
Inputs are addressed through their strides, so slices of a fused qkv need no copy.
"""
import torch
import triton
import triton.language as tl

from megatron_lite.kernels import use_triton
from megatron_lite.kernels._common import ptr_add
from megatron_lite.kernels.reference import apply_rotary_reference


@triton.jit
def _rotate_heads(X, Y, sxh, sxd, syh, syd, n_heads, half, cos, sin,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate the [n_heads, 2*half] block of one token at X into Y."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (d < half)
    x_lo = X + heads * sxh + d * sxd
    y_lo = Y + heads * syh + d * syd
    x1 = tl.load(x_lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_lo + half * sxd, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_lo, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_lo + half * syd, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS, SIN, seqlen, half, n_q_heads, n_k_heads,
    sqb, sqs, sqh, sqd, skb, sks, skh, skd,
    sqob, sqos, sqoh, sqod, skob, skos, skoh, skod, stride_cos_b, stride_cos,
    INVERSE: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    b = token // seqlen
    s = token % seqlen
    d = tl.arange(0, BLOCK_D)[None, :]
    # stride_cos_b is 0 when the batch shares one table row per position.
    cos = tl.load(ptr_add(ptr_add(COS, b, stride_cos_b), s, stride_cos) + d, mask=d < half, other=0.0)
    sin = tl.load(ptr_add(ptr_add(SIN, b, stride_cos_b), s, stride_cos) + d, mask=d < half, other=0.0)
    if INVERSE:
        sin = -sin
    _rotate_heads(ptr_add(ptr_add(Q, b, sqb), s, sqs), ptr_add(ptr_add(QO, b, sqob), s, sqos),
                  sqh, sqd, sqoh, sqod, n_q_heads, half, cos, sin, BLOCK_HQ, BLOCK_D)
    _rotate_heads(ptr_add(ptr_add(K, b, skb), s, sks), ptr_add(ptr_add(KO, b, skob), s, skos),
                  skh, skd, skoh, skod, n_k_heads, half, cos, sin, BLOCK_HK, BLOCK_D)


def _rotate(q, k, cos, sin, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seqlen, n_q_heads, head_dim = q.shape
    if k.shape[:2] != q.shape[:2] or k.shape[3] != head_dim or head_dim % 2:
        raise ValueError(f"need q [b, s, nq, d] and k [b, s, nk, d], d even; got {q.shape}, {k.shape}")
    if cos.shape not in ((seqlen, head_dim // 2), (batch, seqlen, head_dim // 2)) or sin.shape != cos.shape:
        raise ValueError(
            f"cos/sin must be [seq, head_dim/2] = [{seqlen}, {head_dim // 2}] or [batch, seq, head_dim/2], "
            f"got {tuple(cos.shape)}"
        )
    cos, sin = cos.contiguous(), sin.contiguous()
    stride_cos_b = cos.stride(0) if cos.dim() == 3 else 0
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    half = head_dim // 2
    _rope_kernel[(batch * seqlen,)](
        q, k, q_out, k_out, cos, sin, seqlen, half, n_q_heads, k.shape[2],
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), stride_cos_b, cos.stride(-2),
        INVERSE=inverse,
        BLOCK_HQ=triton.next_power_of_2(n_q_heads),
        BLOCK_HK=triton.next_power_of_2(k.shape[2]),
        BLOCK_D=triton.next_power_of_2(half),
        num_warps=4,
    )
    return q_out, k_out


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, k, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq, dk = _rotate(dq_out, dk_out, cos, sin, inverse=True)
        return dq, dk, None, None


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [b, s, nq, d] and k [b, s, nk, d] by the angles whose cos/sin are [s, d/2], or
    [b, s, d/2] with each sample's own positions (fp32). Returns new contiguous (q_out, k_out);
    inputs may be strided views."""
    if not use_triton(q):
        return apply_rotary_reference(q, k, cos, sin)
    return RotaryFunction.apply(q, k, cos, sin)
