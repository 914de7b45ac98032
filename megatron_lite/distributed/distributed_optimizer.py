"""The distributed optimizer (ZeRO-1): each data-parallel rank updates only its shard.

Every bucket of the grad buffer is split into dp equal shards. Rank d receives the reduced
grads of shard d only (a reduce-scatter instead of an all-reduce: half the wire traffic),
keeps Adam moments for shard d only (1/dp of the optimizer memory), updates those
parameter elements, and all-gathers the updated shards so every replica has the full
parameters again. A shard may cut a parameter anywhere, so the optimizer works on "pieces":
views of the flat parameter and grad buffers, one per (parameter, shard) overlap, each
inheriting its parameter's weight-decay group. AdamW is elementwise, so updating pieces
gives exactly the elements the unsharded update would. Muon is not: its momentum updates are
all-gathered whole, bucket by bucket (full_local), and each owner of a piece of a matrix
orthogonalises the full matrix (optimizer.py's _orthogonalized).

The same optimizer steps ZeRO-2 and ZeRO-3 (data_parallel.py): its pieces are views of
whatever the buffers keep of this rank's shard; under ZeRO-3 the updated shards are not
gathered after the step, the next forward gathers each layer's.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.comm import all_gather_flat
from megatron_lite.config import TrainConfig
from megatron_lite.distributed.data_parallel import GRAD_GROUP, DataParallelGrads
from megatron_lite.optimizer.optimizer import LocalOptimizer, MainParam, main_param


class DistributedOptimizer(LocalOptimizer):
    norm_groups = (GRAD_GROUP, "mp")  # each rank holds the grads of its shard only: sum norms over every rank
    expert_groups = ("edp", "pp", "ep")

    def __init__(self, buffers: list[DataParallelGrads], cfg: TrainConfig, experts: bool = False) -> None:
        grid = parallel_state.get_grid()
        self.buffers = buffers
        self.tensors = []  # one per piece: a (parameter, shard) overlap of the flat buffers
        for buf in buffers:  # each sharded over its own group: dp x cp, or edp for experts
            for bucket in buf.buckets:
                shard_lo, shard_hi = bucket.shard(grid.index(buf.group), grid.size(buf.group))
                for p in bucket.params:
                    p_lo, p_hi = buf.ranges[p]
                    lo, hi = max(p_lo, shard_lo), min(p_hi, shard_hi)
                    if lo < hi:
                        self.tensors.append(main_param(buf.param_view(bucket, lo, hi), buf.grad_view(bucket, lo, hi),
                                                       p, lo - p_lo, cfg.optimizer_cpu_offload))
        self._build(cfg, experts)

    def step(self) -> None:
        super().step()
        for buf in self.buffers:
            buf.all_gather_params()

    def finish_param_gather(self) -> None:
        for buf in self.buffers:
            buf.finish_param_gather()

    def main_weights(self) -> dict[nn.Parameter, torch.Tensor]:
        self.finish_param_gather()
        if all(t.main is t.model for t in self.tensors) and not any(b.shard_params for buf in self.buffers
                                                                    for b in buf.buckets):
            return {p: p.detach() for buf in self.buffers for p in buf.ranges}  # fp32: the gathered weights
        return self.full_local([(t, t.main) for t in self.tensors])

    def full_local(self, pieces: list[tuple[MainParam, torch.Tensor]],
                   wanted: Callable[[nn.Parameter], bool] = lambda p: True) -> dict[nn.Parameter, torch.Tensor]:
        """Gather the pieces into fp32 buffers laid out as the full grads, bucket by bucket (the
        buckets holding a `wanted` parameter): every rank gets every rank's pieces."""
        full = {}
        for buf in self.buffers:
            buckets = [b for b in buf.buckets if any(wanted(p) for p in b.params)]
            if not buckets:
                continue
            flat = torch.zeros(buf.size, dtype=torch.float32, device=buf.grad_data.device)
            for t, value in pieces:
                if t.param in buf.ranges:
                    lo = buf.ranges[t.param][0] + t.offset
                    flat[lo:lo + t.main.numel()].copy_(value.flatten())
            for bucket in buckets:
                all_gather_flat(flat[bucket.start:bucket.end], buf.group)
            full.update({p: flat[lo:hi].view_as(p) for bucket in buckets for p in bucket.params if wanted(p)
                         for lo, hi in [buf.ranges[p]]})
        return full
