"""The distributed optimizer (ZeRO-1): each data-parallel rank updates only its shard.

Every bucket of the grad buffer is split into dp equal shards. Rank d receives the reduced
grads of shard d only (a reduce-scatter instead of an all-reduce: half the wire traffic),
keeps Adam moments for shard d only (1/dp of the optimizer memory), updates those
parameter elements, and all-gathers the updated shards so every replica has the full
parameters again. A shard may cut a parameter anywhere, so the optimizer works on "pieces":
views of the flat parameter and grad buffers, one per (parameter, shard) overlap, each
inheriting its parameter's weight-decay group. AdamW is elementwise, so updating pieces
gives exactly the elements the unsharded update would.
"""
from __future__ import annotations

from megatron_lite import parallel_state
from megatron_lite.config import TrainConfig
from megatron_lite.distributed.data_parallel import GRAD_GROUP, DataParallelGrads
from megatron_lite.optimizer import LocalOptimizer


class DistributedOptimizer(LocalOptimizer):
    norm_groups = (GRAD_GROUP, "mp")  # each rank holds the grads of its shard only: sum norms over every rank

    def __init__(self, buffers: list[DataParallelGrads], cfg: TrainConfig) -> None:
        grid = parallel_state.get_grid()
        self.buffers = buffers
        self.tensors = []  # (piece of the flat parameter buffer, its parameter)
        for buf in buffers:
            for bucket in buf.buckets:
                shard_lo, shard_hi = bucket.shard(grid.index(GRAD_GROUP), grid.size(GRAD_GROUP))
                for p in bucket.params:
                    p_lo, p_hi = buf.ranges[p]
                    lo, hi = max(p_lo, shard_lo), min(p_hi, shard_hi)
                    if lo < hi:
                        piece = buf.param_data[lo:hi]
                        piece.grad = buf.grad_data[lo:hi]
                        self.tensors.append((piece, p))
        self.optimizer = self._adamw(cfg)

    def step(self) -> None:
        self.optimizer.step()
        for buf in self.buffers:
            buf.all_gather_params()
