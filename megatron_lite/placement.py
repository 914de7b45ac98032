"""Where each parameter lives on the rank grid: one record per parameter, attached by the layer
that creates it, and read by everything that treats parameters differently by where they live:
gradient reduction (distributed/grad_sync.py), the global grad norm (optimizer/clip_grads.py),
initialisation (model/initialization.py), and checkpoints and their resharding (checkpointing/reshard.py).

A parameter is either split over a grid axis (a `Shard`: the dimension cut, and a stride when
the full dimension is several blocks each cut separately), or whole on every rank of that
axis, a replica. A replica whose rank sees only part of the input (under sequence parallelism
a norm weight sees this rank's tokens only; the tied embedding's two copies each see one use)
receives a partial gradient, summed over `partial_grads` groups before the data-parallel
average. Vocabulary tables are padded to split evenly; `unpadded_rows` says how many rows are
real.

Stride: a stride s means the full dimension is s equal blocks, each split across the ranks
(rank r holds its piece of every block). The SwiGLU fc1 weight is [gate; up], and each rank
needs its slice of both halves, so it has stride 2.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.comm import all_gather

# Axes over which a parameter that is not split is a replica within the model-parallel group
# (pp stages hold different parameters; data-parallel replicas are the optimizer's business).
REPLICA_AXES = ("tp",)


@dataclass(frozen=True)
class Shard:
    axis: str
    dim: int
    stride: int = 1


@dataclass(frozen=True)
class Placement:
    shards: tuple[Shard, ...] = ()
    partial_grads: tuple[str, ...] = ()  # groups whose members each hold part of the gradient
    # Another model chunk of this same rank holds the same tensor (the tied embedding when the
    # first and last stage share a rank, ZB-V): the partial grads add up here too, norms skip it.
    second_copy: bool = False
    unpadded_rows: int | None = None  # rows of dim 0 that are real, when the table is padded

    def shard(self, axis: str) -> Shard | None:
        return next((s for s in self.shards if s.axis == axis), None)

    @property
    def replicas(self) -> tuple[str, ...]:
        """Groups whose members hold this same tensor: each replica axis it is not split over,
        and each group it sums partial gradients over. An expert (split over ep) has none here:
        its replicas, tp ranks included, form the expert-data-parallel group (parallel_state),
        the optimizer's business as dp is for the others."""
        if self.shard("ep") is not None:
            return self.partial_grads
        axes = tuple(a for a in REPLICA_AXES if self.shard(a) is None)
        return axes + tuple(g for g in self.partial_grads if g not in axes)


REPLICATED = Placement()


def sharded(dim: int, stride: int = 1, axis: str = "tp") -> Placement:
    return Placement(shards=(Shard(axis, dim, stride),))


def place(param: nn.Parameter, placement: Placement) -> None:
    param.placement = placement


def place_module(module: nn.Module, placement: Placement) -> None:
    for param in module.parameters():
        place(param, placement)


def with_partial_grads(param: nn.Parameter, group: str) -> None:
    """Add `group` to the groups the parameter's gradient is summed over."""
    current = placement(param)
    if group not in current.partial_grads:
        place(param, replace(current, partial_grads=current.partial_grads + (group,)))


def placement(param: torch.Tensor) -> Placement:
    """The parameter's placement; a parameter no layer placed is replicated."""
    return getattr(param, "placement", REPLICATED)


def counted_here(param: torch.Tensor) -> bool:
    """Whether this rank counts the parameter in a norm summed over the model-parallel group:
    each element exactly once, on the first member of every group that replicates it."""
    grid = parallel_state.get_grid()
    return not placement(param).second_copy and all(grid.index(group) == 0 for group in placement(param).replicas)


def is_vocabulary_table(param: torch.Tensor) -> bool:
    """The input embedding or the output layer (the padded vocabulary tables): what --decoupled-lr
    gives its own learning rate."""
    return placement(param).unpadded_rows is not None


def is_expert(param: torch.Tensor) -> bool:
    """Whether the parameter belongs to a mixture-of-experts layer's experts (split over ep)."""
    return placement(param).shard("ep") is not None


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
    for s in placement(param).shards:
        shape[s.dim] *= parallel_state.get_grid().size(s.axis)
    return torch.Size(shape)


def local_shard(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full` for `param` (full itself when param is replicated)."""
    grid = parallel_state.get_grid()
    for s in placement(param).shards:
        full = shard(full, s.dim, s.stride, grid.index(s.axis), grid.size(s.axis))
    return full


def local_indices(param: torch.Tensor) -> list[torch.Tensor]:
    """Along each dimension, the indices in the full tensor of this rank's piece (what local_shard
    keeps), on the CPU."""
    grid = parallel_state.get_grid()
    index = [torch.arange(n) for n in full_shape(param)]
    for s in placement(param).shards:
        index[s.dim] = shard(index[s.dim], 0, s.stride, grid.index(s.axis), grid.size(s.axis))
    return index


def gather_full(param: torch.Tensor, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """The full tensor of a (possibly sharded) parameter, or of `tensor` sharded like it (its grad),
    on every rank of its shard axes. Collective over those axes."""
    tensor = (param if tensor is None else tensor).detach()
    for s in reversed(placement(param).shards):
        if parallel_state.get_grid().size(s.axis) > 1:
            # Gather along a fresh leading dim, then reassemble honouring the stride.
            tensor = unshard(list(all_gather(tensor.unsqueeze(0), dim=0, group=s.axis).unbind(0)), s.dim, s.stride)
    return tensor.clone()
