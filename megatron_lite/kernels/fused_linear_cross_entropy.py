"""Output projection + vocab-parallel cross entropy without the [N, V] logits.

At N = 16k tokens and V = 128k, logits in fp32 take 8 GiB (and as much again for their
gradient). Here the tokens go through in chunks (by default as many rows as fit in 1 GiB
of logits): per chunk, logits = hidden_c @ W^T, the online-softmax kernel gives loss and
logsumexp, the gradient kernel overwrites that same logits buffer with softmax - onehot
(in place is safe: the buffer is ours and dead after this chunk), and two matmuls turn it
into grad_hidden_c and a contribution to grad_W, accumulated across chunks in fp32. Only
a [chunk, V_local] buffer ever exists.

The gradients are thus computed in forward (as Liger-Kernel does), for d loss_i = 1 per
row. Backward scales them by the real grad_output g: exact for grad_hidden, whose rows
scale independently, and exact for grad_W when g is one number on every non-ignored row
(loss.sum(), loss.mean(), a mean over non-ignored tokens). For any other g (e.g. a loss
mask that is not expressed as ignore_index targets) grad_W is recomputed chunk by chunk
with the true g, from the saved logsumexp, so the result is always exact.

grad_hidden is this rank's partial sum over its vocab shard; as for any column-parallel
layer, the caller's TP mapping all-reduces it.
"""
from typing import Optional

import torch
from torch.torch_version import TorchVersion

from megatron_lite.kernels import use_triton
from megatron_lite.kernels.cross_entropy import softmax_ce_backward, softmax_ce_forward
from megatron_lite.kernels.reference import ReduceFn, fused_linear_cross_entropy_reference

# Each chunk adds its share into the fp32 grad_W, a read-modify-write of V_local x h x 4
# bytes; per chunk the matmuls do 6 x chunk x V_local x h FLOPs. On an H100 (~330 FLOP per
# byte) that traffic stays small next to the matmuls only for chunks of thousands of rows, so
# chunks are as large as a logits buffer of LOGITS_CHUNK_BYTES allows, rather than tiny.
LOGITS_CHUNK_BYTES = 2**30


def _default_chunk_size(n_tokens: int, vocab_local: int, elem_size: int) -> int:
    rows = max(1, LOGITS_CHUNK_BYTES // (vocab_local * elem_size))
    return min(n_tokens, 1 << (rows.bit_length() - 1))  # a power of two, or all the tokens


# addmm's out_dtype (fp32 output from 16-bit operands) exists from torch 2.8 and on CUDA only;
# pyproject allows torch 2.4, and the CPU reference machines have no such kernel.
_ADDMM_OUT_DTYPE = TorchVersion(torch.__version__) >= (2, 8)


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32. For bf16/fp16 operands cuBLAS accumulates in fp32 and,
    given out_dtype, writes fp32, so no chunk's contribution is rounded to 16 bits. Without
    it each chunk's product is rounded once before the fp32 sum, about as exact as the
    unfused path, whose bf16 grad_W is rounded once in all."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _ADDMM_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(a @ b)


def _chunks(n_tokens: int, chunk_size: int) -> list[slice]:
    return [slice(s, min(s + chunk_size, n_tokens)) for s in range(0, n_tokens, chunk_size)]


def _chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    vocab: tuple[int, Optional[int], int],
    reduce_max: ReduceFn,
    reduce_sum: ReduceFn,
    chunk_size: int,
    grad_hidden: Optional[torch.Tensor],
    grad_weight: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) per token; fills grad_hidden / grad_weight (fp32) for d loss = 1 if given."""
    vocab_start_index, vocab_size, ignore_index = vocab
    loss = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(loss)
    unit_dloss = torch.ones(1, dtype=torch.float32, device=hidden.device).expand(hidden.shape[0])
    for rows in _chunks(hidden.shape[0], chunk_size):
        logits = hidden[rows] @ weight.t()
        loss[rows], lse[rows] = softmax_ce_forward(
            logits, target[rows], vocab_start_index, vocab_size, reduce_max, reduce_sum, ignore_index
        )
        if grad_hidden is None and grad_weight is None:
            continue
        dlogits = softmax_ce_backward(
            logits, target[rows], lse[rows], unit_dloss[rows], *vocab, out=logits
        )
        if grad_hidden is not None:
            torch.mm(dlogits, weight, out=grad_hidden[rows])
        if grad_weight is not None:
            _addmm_fp32_(grad_weight, dlogits.t(), hidden[rows])
    return loss, lse


def _exact_grad_weight(hidden, weight, target, lse, dloss, vocab, chunk_size) -> torch.Tensor:
    """grad_W for an arbitrary per-token dloss, recomputing each chunk's logits."""
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for rows in _chunks(hidden.shape[0], chunk_size):
        logits = hidden[rows] @ weight.t()
        softmax_ce_backward(logits, target[rows], lse[rows], dloss[rows], *vocab, out=logits)
        _addmm_fp32_(grad_weight, logits.t(), hidden[rows])
    return grad_weight.to(weight.dtype)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, vocab, reduce_max, reduce_sum, chunk_size):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None
        if need_weight:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss, lse = _chunked_forward(
            hidden, weight, target, vocab, reduce_max, reduce_sum, chunk_size, grad_hidden, grad_weight
        )
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, hidden, weight, target, lse)
        ctx.vocab, ctx.chunk_size = vocab, chunk_size
        return loss

    @staticmethod
    def backward(ctx, dloss):
        grad_hidden, grad_weight, hidden, weight, target, lse = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * dloss.unsqueeze(1).to(grad_hidden.dtype)
        if grad_weight is not None:
            counted = dloss[target != ctx.vocab[2]]
            if counted.numel() == 0:
                grad_weight = torch.zeros_like(grad_weight)
            elif bool((counted == counted[0]).all()):  # one host sync per step
                grad_weight = grad_weight * counted[0].to(grad_weight.dtype)
            else:
                grad_weight = _exact_grad_weight(
                    hidden, weight, target, lse, dloss, ctx.vocab, ctx.chunk_size
                )
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    vocab_start_index: int = 0,
    vocab_size: Optional[int] = None,
    reduce_max: ReduceFn = None,
    reduce_sum: ReduceFn = None,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Per-token cross entropy (fp32, shape of `target`) of logits = hidden @ weight.T,
    never materialising them in full. hidden: [..., h]; weight: this rank's vocab shard
    [V_local, h]; the other arguments are those of `cross_entropy`."""
    if not use_triton(hidden):
        return fused_linear_cross_entropy_reference(
            hidden, weight, target, vocab_start_index, vocab_size, reduce_max, reduce_sum, ignore_index
        )
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # Do what autocast does for a linear, by hand: operands cast to its dtype (the casts
        # carry the grads back), then no autocast inside, where matmuls write into buffers
        # of fixed dtype (out=), which autocast would refuse.
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return fused_linear_cross_entropy(
                hidden.to(dtype), weight.to(dtype), target, vocab_start_index, vocab_size,
                reduce_max, reduce_sum, ignore_index, chunk_size,
            )
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    target1 = target.reshape(-1).contiguous()
    if chunk_size is None:
        chunk_size = _default_chunk_size(hidden2.shape[0], weight.shape[0], hidden.element_size())
    vocab = (vocab_start_index, vocab_size, ignore_index)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss = FusedLinearCrossEntropyFunction.apply(
            hidden2, weight, target1, vocab, reduce_max, reduce_sum, chunk_size
        )
    else:  # evaluation: no gradients to precompute
        loss, _ = _chunked_forward(
            hidden2, weight, target1, vocab, reduce_max, reduce_sum, chunk_size, None, None
        )
    return loss.view(target.shape)
