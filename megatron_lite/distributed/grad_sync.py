"""Gradient reductions that make every rank's grads those of the single-device model.

Both run once per optimizer step, after the last microbatch's backward, on all grads of a
kind flattened into one buffer, so there is one collective per step rather than one per
tensor or per microbatch.
"""
from __future__ import annotations

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron_lite import parallel_state
from megatron_lite.tensor_parallel.mappings import all_reduce


def _all_reduce_coalesced(grads: list[torch.Tensor], group: str, scale: float = 1.0) -> None:
    if not grads or parallel_state.get_grid().size(group) == 1:
        return
    flat = all_reduce(_flatten_dense_tensors(grads), group=group)
    if scale != 1.0:
        flat.mul_(scale)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def allreduce_sequence_parallel_grads(model: nn.Module) -> None:
    """Sum over tp the grads of params replicated across tp that saw only this rank's tokens under SP."""
    grads = [p.grad for p in model.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
    _all_reduce_coalesced(grads, "tp")


def allreduce_data_parallel_grads(model: nn.Module) -> None:
    """Average grads over the data-parallel replicas: each computed the loss of its slice of the batch."""
    dp = parallel_state.get_data_parallel_world_size()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    _all_reduce_coalesced(grads, "dp", 1.0 / dp)


def average_across_data_parallel(value: float) -> float:
    """Mean of a per-replica scalar (a loss) over the data-parallel group."""
    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    return all_reduce(torch.tensor([value], dtype=torch.float64, device=device), group="dp").item() / dp
