"""Vocab-parallel cross entropy with an online softmax (Megatron's vocab_parallel_cross_entropy).

Each tensor-parallel rank holds logits [N, V_local] for global ids
[vocab_start_index, vocab_start_index + V_local). Per row, loss = logsumexp(x) - x[target]
over the whole vocab, which the ranks assemble from three local numbers:

  m_r = max of the local logits,   s_r = sum exp(x - m_r),   z_r = x[target] if held here else 0
  M = max_r m_r (all-reduce max),  S = sum_r s_r exp(m_r - M),  z = sum_r z_r (one all-reduce sum)
  loss = log S + M - z.

The kernel finds m_r and s_r in a single pass over the row without ever holding the
softmax: it walks the row in blocks keeping a running max m and a running sum s relative
to it; when a block raises the max to m', the old sum is rescaled by exp(m - m') first:
  s' = s exp(m - m') + sum_block exp(x - m').
Subtracting the max keeps every exp <= 1, so nothing overflows even in fp32.

Backward needs no collective: with lse = M + log S saved, d loss / d x_j = softmax_j -
[j == target] = exp(x_j - lse) - onehot_j, written per block straight into the gradient
buffer. Columns whose global id is >= vocab_size are padding (the embedding table is
padded to a multiple of the TP size): they are outside the softmax and get zero gradient.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from megatron_lite.kernels import use_triton
from megatron_lite.kernels._common import as_rows, ptr_add
from megatron_lite.kernels.reference import ReduceFn, cross_entropy_reference, n_valid_columns


@triton.jit
def _ce_stats_kernel(
    LOGITS, TARGET, MAX, SUMEXP, TARGET_LOGIT, stride, n_valid, vocab_start, ignore_index,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    logits = ptr_add(LOGITS, row, stride)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    for start in range(0, n_valid, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(logits + cols, mask=cols < n_valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    target = tl.load(TARGET + row)
    local = target - vocab_start
    in_shard = (local >= 0) & (local < n_valid) & (target != ignore_index)
    z = tl.load(logits + local, mask=in_shard, other=0.0).to(tl.float32)
    tl.store(MAX + row, m)
    tl.store(SUMEXP + row, s)
    tl.store(TARGET_LOGIT + row, z)


@triton.jit
def _ce_grad_kernel(
    LOGITS, GRAD, TARGET, LSE, DLOSS, stride_logits, stride_grad, stride_dloss,
    n_cols, n_valid, vocab_start, ignore_index, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    target = tl.load(TARGET + row)
    lse = tl.load(LSE + row)
    dloss = tl.load(ptr_add(DLOSS, row, stride_dloss)).to(tl.float32)
    dloss = tl.where(target == ignore_index, 0.0, dloss)
    local = target - vocab_start
    logits = ptr_add(LOGITS, row, stride_logits)
    grad = ptr_add(GRAD, row, stride_grad)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(logits + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        p = tl.where(cols < n_valid, tl.exp(x - lse), 0.0)
        p = tl.where(cols == local, p - 1.0, p)
        # Same program, same block, read then written: GRAD may alias LOGITS.
        tl.store(grad + cols, (p * dloss).to(GRAD.dtype.element_ty), mask=cols < n_cols)


def _launch_config(device: torch.device) -> dict:
    # On a GPU a wide block streams the row; the interpreter gets a small one so that
    # the tests' rows span several blocks and exercise the online rescaling.
    return dict(BLOCK=4096, num_warps=8) if device.type == "cuda" else dict(BLOCK=256, num_warps=4)


def softmax_ce_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    vocab_start_index: int,
    vocab_size: Optional[int],
    reduce_max: ReduceFn,
    reduce_sum: ReduceFn,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) per row of 2-D `logits`, both fp32 [N]; lse is the global logsumexp."""
    n_rows, n_cols = logits.shape
    local_max, sumexp, target_logit = torch.empty((3, n_rows), dtype=torch.float32, device=logits.device)
    _ce_stats_kernel[(n_rows,)](
        logits, target, local_max, sumexp, target_logit, logits.stride(0),
        n_valid_columns(n_cols, vocab_start_index, vocab_size), vocab_start_index, ignore_index,
        **_launch_config(logits.device),
    )
    global_max = local_max.clone()
    if reduce_max is not None:
        reduce_max(global_max)
    # Rescale each shard's sum to the common max; sum-exp and target logit share one all-reduce.
    sums = torch.stack((sumexp * torch.exp(local_max - global_max), target_logit))
    if reduce_sum is not None:
        reduce_sum(sums)
    lse = global_max + torch.log(sums[0])
    loss = torch.where(target == ignore_index, 0.0, lse - sums[1])
    return loss, lse


def softmax_ce_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    dloss: torch.Tensor,
    vocab_start_index: int,
    vocab_size: Optional[int],
    ignore_index: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write (softmax - onehot) * dloss[:, None] into `out`, which may be `logits` itself."""
    n_rows, n_cols = logits.shape
    _ce_grad_kernel[(n_rows,)](
        logits, out, target, lse, dloss, logits.stride(0), out.stride(0), dloss.stride(0),
        n_cols, n_valid_columns(n_cols, vocab_start_index, vocab_size), vocab_start_index, ignore_index,
        **_launch_config(logits.device),
    )
    return out


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start_index, vocab_size, reduce_max, reduce_sum, ignore_index):
        loss, lse = softmax_ce_forward(
            logits, target, vocab_start_index, vocab_size, reduce_max, reduce_sum, ignore_index
        )
        ctx.save_for_backward(logits, target, lse)
        ctx.args = (vocab_start_index, vocab_size, ignore_index)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        logits, target, lse = ctx.saved_tensors
        vocab_start_index, vocab_size, ignore_index = ctx.args
        # A fresh buffer, not logits in place: the caller may still hold the logits.
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        softmax_ce_backward(logits, target, lse, dloss, vocab_start_index, vocab_size, ignore_index, grad)
        return grad, None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    vocab_start_index: int = 0,
    vocab_size: Optional[int] = None,
    reduce_max: ReduceFn = None,
    reduce_sum: ReduceFn = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-row cross entropy (fp32, shape of `target`, no reduction) of this rank's vocab
    shard `logits` [..., V_local]. `reduce_max` / `reduce_sum` all-reduce a tensor in place
    over the TP group (None: single device); `vocab_size` is the unpadded global vocab.
    Rows whose target is `ignore_index` get loss 0 and zero gradient."""
    if not use_triton(logits):
        return cross_entropy_reference(
            logits, target, vocab_start_index, vocab_size, reduce_max, reduce_sum, ignore_index
        )
    loss = CrossEntropyFunction.apply(
        as_rows(logits), target.reshape(-1).contiguous(),
        vocab_start_index, vocab_size, reduce_max, reduce_sum, ignore_index,
    )
    return loss.view(target.shape)
