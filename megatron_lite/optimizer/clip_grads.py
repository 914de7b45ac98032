"""Global gradient-norm clipping that counts every parameter exactly once across the layout."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from megatron_lite.comm import all_reduce
from megatron_lite.placement import counted_here, is_expert


def layout_sum(tensors: list[tuple[torch.Tensor, nn.Parameter]], term: Callable[[torch.Tensor], torch.Tensor],
               dtype: torch.dtype, groups: tuple[str, ...], expert_groups: tuple[str, ...] | None) -> torch.Tensor:
    """The sum of term(tensor) over the whole model, each element counted once, on every rank:
    the tensors this rank holds (whole, or the distributed optimizer's shards of them), paired
    with their parameters and summed over the groups as clip_grad_norm describes."""
    device = tensors[0][0].device
    plain = torch.zeros((), dtype=dtype, device=device)
    experts = torch.zeros((), dtype=dtype, device=device)
    for tensor, param in tensors:
        if counted_here(param):
            if expert_groups is not None and is_expert(param):
                experts += term(tensor)
            else:
                plain += term(tensor)
    for group in groups:
        all_reduce(plain, group=group)
    for group in expert_groups or ():
        all_reduce(experts, group=group)
    return plain + experts


def clip_grad_norm(grads: list[tuple[torch.Tensor, nn.Parameter]], max_norm: float,
                   groups: tuple[str, ...] = ("mp",), expert_groups: tuple[str, ...] | None = None) -> float:
    """Scale the grads so the global L2 norm is at most max_norm (0: measure only); returns the norm.

    `grads` pairs each grad tensor this rank holds (a whole grad, or the shard of it the
    distributed optimizer owns) with its parameter. Each element counts once: a parameter
    split over tp on every tp rank, one replicated over tp on tp rank 0 only, the tied
    embedding on the first stage only (placement.counted_here). The squares are then summed
    over `groups`: the model-parallel group (tp x pp), and with the distributed optimizer the
    data-parallel group too. Experts (split over ep) count on every rank and sum over
    `expert_groups` instead: pp and ep, and edp with the distributed optimizer (the expert grid's
    replicas, tp ranks among them, otherwise hold the same grads). Given whenever the model has
    experts, so every rank runs the same collectives. The result equals the single-device norm.
    """
    total = layout_sum(grads, lambda grad: torch.linalg.vector_norm(grad.float()).square(), torch.float32, groups,
                       expert_groups).sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad, _ in grads:
            grad.mul_(scale.to(grad.dtype))
    return total.item()
