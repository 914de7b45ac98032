"""Global gradient-norm clipping that counts every parameter exactly once across the layout."""
from __future__ import annotations

import torch
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.tensor_parallel.mappings import all_reduce
from megatron_lite.tensor_parallel.utils import is_partitioned


def clip_grad_norm(grads: list[tuple[torch.Tensor, nn.Parameter]], max_norm: float,
                   groups: tuple[str, ...] = ("mp",)) -> float:
    """Scale the grads so the global L2 norm is at most max_norm (0: measure only); returns the norm.

    `grads` pairs each grad tensor this rank holds (a whole grad, or the shard of it the
    distributed optimizer owns) with its parameter. Sharded params contribute on every tp
    rank; params replicated across tp on tp rank 0 only, and the last stage's copy of a tied
    embedding not at all. The squares are then summed over `groups`: the model-parallel group
    (tp x pp), and with the distributed optimizer the data-parallel group too. The result
    equals the single-device norm.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    squares = torch.zeros((), dtype=torch.float32, device=grads[0][0].device)
    for grad, param in grads:
        if (is_partitioned(param) or tp_rank == 0) and not getattr(param, "shared_embedding", False):
            squares += torch.linalg.vector_norm(grad.float()).square()
    for group in groups:
        all_reduce(squares, group=group)
    total = squares.sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad, _ in grads:
            grad.mul_(scale.to(grad.dtype))
    return total.item()
