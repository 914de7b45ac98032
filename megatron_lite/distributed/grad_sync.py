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
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    grads = [c.word_embeddings.weight.grad for c in chunks
             if hasattr(c, "word_embeddings") and c.word_embeddings.weight.grad is not None
             and c.config.tie_embeddings]
    _all_reduce_coalesced(grads, "embedding")


def allreduce_data_parallel_grads(chunks: list[nn.Module]) -> None:
    """Average grads over the data-parallel replicas: each computed the loss of its slice of the batch."""
    _all_reduce_coalesced(_grads(chunks), "dp", 1.0 / parallel_state.get_data_parallel_world_size())


def average_across_data_parallel(value: float) -> float:
    """Mean of a per-replica scalar (a loss) over the data-parallel group."""
    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    return all_reduce(torch.tensor([value], dtype=torch.float64, device=device), group="dp").item() / dp
