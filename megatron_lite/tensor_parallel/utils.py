"""How a tensor-parallel parameter maps to its full tensor: attributes, sharding and gathering.

A sharded parameter carries `tensor_model_parallel=True`, `partition_dim` and
`partition_stride`. A stride s means the full dimension is s equal blocks, each split across
the ranks (rank r holds its piece of every block): the SwiGLU fc1 weight is [gate; up], and
each rank needs its slice of both halves, so it has stride 2.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.tensor_parallel.mappings import all_gather


def mark_partitioned(param: nn.Parameter, dim: int, stride: int = 1) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = stride


def is_partitioned(param: torch.Tensor) -> bool:
    return getattr(param, "tensor_model_parallel", False)


def shard(full: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s piece of the full tensor (see the module docstring for stride)."""
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(size, dim=dim)[rank] for b in blocks], dim=dim)


def unshard(pieces: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of shard: the full tensor from every rank's piece, in rank order."""
    per_rank = [p.chunk(stride, dim=dim) for p in pieces]
    return torch.cat([torch.cat([blocks[i] for blocks in per_rank], dim=dim) for i in range(stride)], dim=dim)


def full_shape(param: torch.Tensor) -> torch.Size:
    shape = list(param.shape)
    if is_partitioned(param):
        shape[param.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
    return torch.Size(shape)


def local_shard(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full` for `param` (full itself when param is replicated)."""
    if not is_partitioned(param):
        return full
    return shard(full, param.partition_dim, param.partition_stride,
                 parallel_state.get_tensor_model_parallel_rank(),
                 parallel_state.get_tensor_model_parallel_world_size())


def gather_full(param: torch.Tensor, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """The full tensor of a (possibly sharded) parameter, or of `tensor` sharded like it (its grad),
    on every tp rank."""
    tensor = (param if tensor is None else tensor).detach()
    if not is_partitioned(param) or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return tensor.clone()
    # Gather along a fresh leading dim, then reassemble honouring the stride.
    gathered = all_gather(tensor.unsqueeze(0), dim=0)
    return unshard(list(gathered.unbind(0)), param.partition_dim, param.partition_stride)
