"""Global gradient-norm clipping that counts every parameter exactly once across the layout."""
from __future__ import annotations

import torch

from megatron_lite import parallel_state
from megatron_lite.tensor_parallel.mappings import all_reduce
from megatron_lite.tensor_parallel.utils import is_partitioned


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Scale grads so the global L2 norm is at most max_norm (0: measure only); returns the norm.

    Sharded params contribute their slice on every tp rank; params replicated across tp
    contribute on tp rank 0 only, and the last stage's copy of a tied embedding not at all.
    The squares are summed over the model-parallel group (tp x pp), so the norm equals the
    single-device one. Data-parallel replicas hold identical grads after
    their all-reduce and are not summed.
    """
    grads = [p.grad for p in params if p.grad is not None]
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    owned = [p.grad for p in params if p.grad is not None and (is_partitioned(p) or tp_rank == 0)
             and not getattr(p, "shared_embedding", False)]
    squares = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for g in owned:
        squares += torch.linalg.vector_norm(g.float()).square()
    total = all_reduce(squares, group="mp").sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
    return total.item()
