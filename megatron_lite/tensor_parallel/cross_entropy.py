"""Cross-entropy over logits split by vocabulary across the tp group, never gathering them.

Each rank holds logits for vocabulary ids [start, start + V/tp). The softmax needs three
row-wise numbers that are global over the vocabulary, and each is a cheap all-reduce of one
value per token:

  m = max_v z_v               (all-reduce MAX; subtracting it keeps exp() finite)
  S = sum_v exp(z_v - m)      (all-reduce SUM)
  t = z_target - m            (all-reduce SUM; only the owning rank contributes)

  loss = log S - t,   d loss / d z_v = softmax_v - [v == target]

Pad ids (>= the true vocab size, added so the table splits evenly) are masked to -inf, so
they take no probability and receive no gradient.

vocab_parallel_linear_cross_entropy also applies the output layer; with `fused=True` it runs
`kernels.fused_linear_cross_entropy` (the output matmul and an online-softmax loss, chunked
over tokens; Triton on GPU), given this module's metered all-reduces for its max and sums.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import torch.distributed as dist

from megatron_lite import parallel_state
from megatron_lite.tensor_parallel.mappings import all_reduce


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_size: int) -> torch.Tensor:
        ctx.dtype = logits.dtype
        local_vocab = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * local_vocab
        ids = torch.arange(start, start + local_vocab, device=logits.device)
        logits = logits.float().masked_fill(ids >= vocab_size, float("-inf"))

        row_max = all_reduce(logits.max(dim=-1).values, op=dist.ReduceOp.MAX)
        shifted = logits - row_max.unsqueeze(-1)
        owned = (target >= start) & (target < start + local_vocab)
        local_target = (target - start).clamp(0, local_vocab - 1)
        # where(), not a product: a shard made only of pad ids holds -inf, and -inf * 0 is nan.
        target_logit = torch.where(owned, shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1), 0.0)
        all_reduce(target_logit)
        exp = shifted.exp()
        sum_exp = all_reduce(exp.sum(dim=-1))

        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), owned, local_target)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        softmax, owned, local_target = ctx.saved_tensors
        grad = softmax.scatter_add(-1, local_target.unsqueeze(-1), -owned.unsqueeze(-1).to(softmax.dtype))
        return (grad * grad_loss.unsqueeze(-1)).to(ctx.dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token loss (fp32, shape of target) from this rank's vocabulary shard of the logits."""
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_size)


def vocab_parallel_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                        vocab_size: int, fused: bool = False) -> torch.Tensor:
    """Per-token loss of logits = hidden @ weight^T, weight being this rank's vocabulary shard.

    `hidden` has already entered the tensor-parallel region (full sequence, f mapping). Plain:
    the logits shard, then the cross-entropy above. Fused: the Triton kernel computes the
    logits chunk by chunk with their gradients and never holds the [tokens, vocab/tp] logits,
    reducing the same three numbers per token over the tp group through `all_reduce`.
    """
    if not fused:
        return vocab_parallel_cross_entropy(F.linear(hidden, weight), target, vocab_size)
    # Imported here, so that the unfused path never imports Triton.
    from kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
    start = parallel_state.get_tensor_model_parallel_rank() * weight.shape[0]
    loss = fused_linear_cross_entropy(hidden.flatten(0, -2), weight, target.flatten(), start, vocab_size,
                                      reduce_max=functools.partial(all_reduce, op=dist.ReduceOp.MAX),
                                      reduce_sum=all_reduce)
    return loss.view(target.shape)
