"""The plain-torch reference of every op in `megatron_lite/kernels/`, the one copy of each op's math.

Each is what its kernel is tested against, what its public op runs when it does not run
Triton (`megatron_lite.kernels.use_triton`), and the op the model computes with under --no-fused-kernels.
Each has the signature of the public op it stands for, and the kernels' numerics: the math
in fp32 whatever the input dtype, the result cast back to the input's dtype (the losses stay
fp32), so that a kernel and its reference differ by rounding only in every dtype.

This module imports nothing but torch: the model's plain-torch path must load where Triton
is absent (it is a Linux-only dependency).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
# A norm returns y, or (y, h) when given a residual: h = x + residual is the next residual stream.
NormOutput = Tensor | tuple[Tensor, Tensor]
# An in-place all-reduce of a tensor over the tensor-parallel group; None on one device.
ReduceFn = Callable[[Tensor], None] | None


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> NormOutput:
    """Llama's norm over the last dim: h / rms(h) * weight, h = x [+ residual]."""
    h = x if residual is None else x + residual
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


def layer_norm_reference(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float,
                         residual: Tensor | None = None) -> NormOutput:
    """GPT-2's norm over the last dim: (h - mean) / std * weight [+ bias], h = x [+ residual]."""
    h = x if residual is None else x + residual
    b = None if bias is None else bias.float()
    y = F.layer_norm(h.float(), h.shape[-1:], weight.float(), b, eps).to(x.dtype)
    return y if residual is None else (y, h)


def apply_rotary_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q [b, s, nq, d] and k [b, s, nk, d] by the angles whose cos/sin are [s, d/2]
    or, each sample its own positions, [b, s, d/2] (fp32), in the Hugging Face "rotate half"
    convention: pairs (x[i], x[i + d/2])."""
    c, s = cos[..., None, :], sin[..., None, :]

    def rotate(x: Tensor) -> Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def swiglu_reference(x: Tensor) -> Tensor:
    """silu(a) * b for a, b = x.chunk(2, -1); x: [..., 2f] -> [..., f]."""
    a, b = x.float().chunk(2, dim=-1)
    return (F.silu(a) * b).to(x.dtype)


def gelu_reference(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (GPT-2's gelu_new), elementwise."""
    return F.gelu(x.float(), approximate="tanh").to(x.dtype)


def visible_keys(q_len: int, k_len: int, window: int | None = None, offset: int = 0,
                 device: torch.device | None = None, doc_start: Tensor | None = None) -> Tensor:
    """[q_len, k_len] bool: which keys each query attends to under a causal mask, with a sliding
    window if `window` is set: key j is visible to query i when 0 <= i + offset - j <= window
    (the query itself and the `window` keys before it). `offset` is how many positions the
    first query sits after the first key (a cached prefix, or a context-parallel chunk pair).
    With `doc_start` ([b, q_len] int, document masking) [b, 1, q_len, k_len]: key j is also
    hidden from query i of sample b when j < doc_start[b, i], the first key of i's document
    counted in k's positions (the keys of earlier documents)."""
    distance = offset + torch.arange(q_len, device=device)[:, None] - torch.arange(k_len, device=device)
    visible = distance >= 0
    if window is not None:
        visible = visible & (distance <= window)
    return visible if doc_start is None else visible & same_document(doc_start, k_len)


def same_document(doc_start: Tensor, k_len: int) -> Tensor:
    """[b, 1, q_len, k_len] bool: key j lies at or after the first key of query i's document,
    doc_start [b, q_len] (keys later in the sequence are the causal mask's business)."""
    return (torch.arange(k_len, device=doc_start.device) >= doc_start[..., None])[:, None]


def flash_attention_reference(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                              softmax_scale: float | None = None, dropout_p: float = 0.0,
                              window: int | None = None, doc_start: Tensor | None = None) -> Tensor:
    """Attention of q [b, nh, s, d] over k, v [b, nkv, s, d]: torch SDPA with each kv head
    repeated for the nh / nkv query heads of its group; `window` (causal only) limits each
    query to itself and the `window` keys before it; `doc_start` [b, s] (causal only) hides
    the keys before each query's document, as in visible_keys. `dropout_p` is beyond the
    kernel, which has no dropout: the model trains with it on this path."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if window is None and doc_start is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
    if not causal:
        raise ValueError("a sliding window or a document mask is for causal attention")
    mask = visible_keys(q.shape[2], k.shape[2], window, device=q.device, doc_start=doc_start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale)


def _masked_scores(q: Tensor, k: Tensor, scale: float, causal: bool, window: int | None, offset: int,
                   doc_start: Tensor | None) -> Tensor:
    """fp32 q k^T * scale with the keys each query does not see at -inf: none hidden when not
    causal and no window; a block off the diagonal (offset > 0) is causal with its offset;
    `doc_start` hides the keys of earlier documents, causal or not."""
    scores = q.float() @ k.float().transpose(-1, -2) * scale
    if causal or window is not None:
        visible = visible_keys(q.shape[-2], k.shape[-2], window, offset, q.device, doc_start)
        scores = scores.masked_fill(~visible, float("-inf"))
    elif doc_start is not None:
        scores = scores.masked_fill(~same_document(doc_start, k.shape[-2]), float("-inf"))
    return scores


def _probabilities(scores: Tensor, lse: Tensor) -> Tensor:
    """exp(scores - lse); 0 for a row that sees no key (lse -inf), not exp(-inf + inf) = nan."""
    return torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])


def attention_forward_reference(q: Tensor, k: Tensor, v: Tensor, causal: bool,
                                softmax_scale: float | None = None, window: int | None = None,
                                offset: int = 0, doc_start: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Attention of q [b, nh, s, d] over k, v [b, nkv, s, d] (GQA) and the natural-log
    logsumexp of each query row's scores, fp32 [b, nh, s]: what flash attention keeps for its
    backward, and what lets partial results over key blocks be merged (ring attention).
    `window`, `offset` and `doc_start` as in visible_keys, for a block of a sliding-window or
    document-masked attention: a row of the block that sees no key gets output 0 and lse -inf,
    which merges as nothing."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1).float()
    scores = _masked_scores(q, k, scale, causal, window, offset, doc_start)
    lse = torch.logsumexp(scores, dim=-1)
    return (_probabilities(scores, lse) @ v).to(q.dtype), lse


def attention_backward_reference(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                                 causal: bool, softmax_scale: float | None = None, window: int | None = None,
                                 offset: int = 0, doc_start: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of one key block, FlashAttention-2's way: the probabilities are recomputed from
    the scores and `lse`, and delta = rowsum(dout * out). `out` and `lse` are those of the whole
    attention (every key block merged), so the grads of several blocks add up to the whole's."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    b, nh, s, d = q.shape
    group = nh // k.shape[1]
    kf, vf = k.repeat_interleave(group, dim=1).float(), v.repeat_interleave(group, dim=1).float()
    qf, dof = q.float(), dout.float()
    probs = _probabilities(_masked_scores(qf, kf, scale, causal, window, offset, doc_start), lse)
    delta = (dof * out.float()).sum(-1, keepdim=True)
    dscores = probs * (dof @ vf.transpose(-1, -2) - delta)
    dq = dscores @ kf * scale
    dk = (dscores.transpose(-1, -2) @ qf * scale).view(b, -1, group, s, d).sum(2)
    dv = (probs.transpose(-1, -2) @ dof).view(b, -1, group, s, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def n_valid_columns(n_cols: int, vocab_start_index: int, vocab_size: int | None) -> int:
    """How many leading columns of a vocab shard are real vocab entries (the rest are pad)."""
    if vocab_size is None:
        return n_cols
    return max(0, min(n_cols, vocab_size - vocab_start_index))


def _replicated_sum(t: Tensor, reduce_sum: ReduceFn) -> Tensor:
    """Sum of t over the TP ranks, with the gradient flowing to the local t alone.

    Every rank ends up with the same loss, so each rank's shard receives exactly the
    gradient of that one loss through its own terms: the straight-through form below, whose
    value is the sum bit for bit on every rank (t - t is exactly 0; `t + (total - t)` would
    round differently on each rank, whose t differ).
    """
    if reduce_sum is None:
        return t
    total = t.detach().clone()
    reduce_sum(total)
    return total + (t - t.detach())


def cross_entropy_reference(logits: Tensor, target: Tensor, vocab_start_index: int = 0,
                            vocab_size: int | None = None, reduce_max: ReduceFn = None,
                            reduce_sum: ReduceFn = None, ignore_index: int = -100) -> Tensor:
    """Per-row cross entropy (fp32, shape of `target`) of this rank's vocab shard `logits`
    [..., V_local], holding global ids from `vocab_start_index`; the contract of
    `megatron_lite.kernels.cross_entropy.cross_entropy`. Pad columns (ids >= vocab_size) take no probability."""
    n_cols = logits.shape[-1]
    x = logits.float()
    pad = torch.arange(n_cols, device=x.device) >= n_valid_columns(n_cols, vocab_start_index, vocab_size)
    x = x.masked_fill(pad, float("-inf"))
    # The max is only a shift (logsumexp does not depend on it), so it carries no gradient.
    global_max = x.max(dim=-1).values.detach()
    if reduce_max is not None:
        reduce_max(global_max)
    sumexp = torch.exp(x - global_max.unsqueeze(-1)).sum(dim=-1)
    local = target - vocab_start_index
    in_shard = (local >= 0) & (local < n_cols) & (target != ignore_index)
    z = x.gather(-1, local.clamp(0, n_cols - 1).unsqueeze(-1)).squeeze(-1)
    # where(), not a product: a shard made only of pad ids holds -inf, and -inf * 0 is nan.
    z = torch.where(in_shard, z, 0.0)
    # Sum-exp and target logit share one all-reduce.
    sumexp, z = _replicated_sum(torch.stack((sumexp, z)), reduce_sum)
    loss = torch.log(sumexp) + global_max - z
    return torch.where(target == ignore_index, 0.0, loss)


def fused_linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, target: Tensor,
                                         vocab_start_index: int = 0, vocab_size: int | None = None,
                                         reduce_max: ReduceFn = None, reduce_sum: ReduceFn = None,
                                         ignore_index: int = -100) -> Tensor:
    """Unfused: the full logits hidden @ weight.T, then `cross_entropy_reference`."""
    return cross_entropy_reference(
        hidden @ weight.t(), target, vocab_start_index, vocab_size, reduce_max, reduce_sum, ignore_index
    )
