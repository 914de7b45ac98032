"""Gradient reductions over the model-parallel groups, and the data-parallel loss average.

Both grad reductions run once per optimizer step, after the last microbatch's backward and
before the data-parallel reduction (data_parallel.py), on all grads of a kind flattened
into one buffer: one collective per step rather than one per tensor or per microbatch.
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


def _grads(chunks: list[nn.Module], flag: str | None = None) -> list[torch.Tensor]:
    return [p.grad for c in chunks for p in c.parameters()
            if p.grad is not None and (flag is None or getattr(p, flag, False))]


def allreduce_sequence_parallel_grads(chunks: list[nn.Module]) -> None:
    """Sum over tp the grads of params replicated across tp that saw only this rank's tokens under SP."""
    _all_reduce_coalesced(_grads(chunks, "sequence_parallel"), "tp")


def allreduce_embedding_grads(chunks: list[nn.Module]) -> None:
    """Sum the grads of the tied word embedding held by the first and the last pipeline stage.

    Both copies start equal and must stay equal: each gets the sum of the input-embedding
    grad (first stage) and the output-layer grad (last stage), as the single tied tensor would.
    """
    _all_reduce_coalesced(_grads(chunks, "tied_across_stages"), "embedding")


def needs_model_parallel_reduction(param: torch.Tensor) -> bool:
    """Whether this param's grad is summed over tp (SP) or over the embedding group before the dp reduction."""
    return getattr(param, "sequence_parallel", False) or getattr(param, "tied_across_stages", False)


def average_across_data_parallel(value: float) -> float:
    """Mean of a per-replica scalar (a loss) over the data-parallel group."""
    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    return all_reduce(torch.tensor([value], dtype=torch.float64, device=device), group="dp").item() / dp
