"""Cross-entropy over logits split by vocabulary across the tp group, never gathering them.

Each rank holds logits for vocabulary ids [start, start + V/tp). The softmax needs three
row-wise numbers that are global over the vocabulary, and each is a cheap all-reduce of one
value per token:

  m = max_v z_v               (all-reduce MAX; subtracting it keeps exp() finite)
  S = sum_v exp(z_v - m)      (all-reduce SUM)
  t = z_target                (all-reduce SUM, with S; only the owning rank contributes)

  loss = log S + m - t,   d loss / d z_v = softmax_v - [v == target]

Pad ids (>= the true vocab size, added so the table splits evenly) are masked to -inf, so
they take no probability and receive no gradient.

The math is that of `megatron_lite/kernels/`: plain torch, `megatron_lite.kernels.reference.cross_entropy_reference`;
with `fused=True`, `megatron_lite.kernels.fused_linear_cross_entropy` (the output matmul and an
online-softmax loss, chunked over tokens; Triton on GPU). This module gives either one the
shard's first id and its metered all-reduces over the tp group.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_lite import parallel_state
from megatron_lite.comm import all_reduce
from megatron_lite.kernels.reference import cross_entropy_reference

_all_reduce_max = functools.partial(all_reduce, op=dist.ReduceOp.MAX)


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token loss (fp32, shape of target) from this rank's vocabulary shard of the logits."""
    start = parallel_state.get_grid().coord("tp") * logits.shape[-1]
    return cross_entropy_reference(logits, target, start, vocab_size, reduce_max=_all_reduce_max,
                                   reduce_sum=all_reduce)


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
    from megatron_lite.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
    start = parallel_state.get_grid().coord("tp") * weight.shape[0]
    loss = fused_linear_cross_entropy(hidden.flatten(0, -2), weight, target.flatten(), start, vocab_size,
                                      reduce_max=_all_reduce_max, reduce_sum=all_reduce)
    return loss.view(target.shape)
