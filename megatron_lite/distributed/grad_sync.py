"""The gradient sums that come before the data-parallel average, and the data-parallel loss average.

A replicated parameter whose copies each saw part of the step (placement.partial_grads: "tp"
for norm weights under sequence parallelism, "embedding" for the tied embedding's copies on
the first and last stage) holds a partial gradient; the copies' sum is the single-device
gradient. These sums run once per optimizer step, after the last microbatch's backward and
before the data-parallel reduction (data_parallel.py, which defers these parameters' buckets
until then), on all grads of a group flattened into one buffer: one collective per group and
step rather than one per tensor or per microbatch.
"""
from __future__ import annotations

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron_lite import parallel_state
from megatron_lite.comm import all_reduce
from megatron_lite.placement import placement


def _step_grad(param: nn.Parameter) -> torch.Tensor | None:
    """The gradient the optimizer step reads: the fp32 grad buffer's view (`main_grad`, which a
    bf16/fp16 parameter's grad is added into as backward makes it, its .grad then freed; an fp32
    parameter's .grad is the same view), or .grad for a parameter without a buffer."""
    return param.main_grad if hasattr(param, "main_grad") else param.grad


def reduce_partial_grads(chunks: list[nn.Module]) -> None:
    """Sum every partial gradient over its groups (a fixed order of groups on every rank)."""
    params = [p for c in chunks for p in c.parameters() if _step_grad(p) is not None]
    for group in sorted({g for p in params for g in placement(p).partial_grads}):
        members = [p for p in params if group in placement(p).partial_grads]
        # A second copy on this rank (ZB-V's tied embedding, both stages on rank 0) adds into the
        # first, which then takes part in the group's sum, and takes the result back.
        grads = [_step_grad(p) for p in members if not placement(p).second_copy]
        copies = [_step_grad(p) for p in members if placement(p).second_copy]
        for grad, copy in zip(grads, copies):
            grad.add_(copy)
        if parallel_state.get_grid().size(group) > 1:
            flat = all_reduce(_flatten_dense_tensors(grads), group=group)
            for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(summed)
        for grad, copy in zip(grads, copies):
            copy.copy_(grad)


def needs_partial_grad_reduction(param: torch.Tensor) -> bool:
    """Whether this param's grad is summed over another group before the data-parallel reduction."""
    return bool(placement(param).partial_grads)


def average_across_data_parallel(value: float) -> float:
    """Mean of a per-replica scalar (a loss) over the data-parallel group."""
    dp = parallel_state.get_grid().size("dp")
    if dp == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    return all_reduce(torch.tensor([value], dtype=torch.float64, device=device), group="dp").item() / dp
