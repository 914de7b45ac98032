"""Data-parallel gradient reduction: a contiguous grad buffer per model chunk, reduced in buckets
that start while backward is still running.

Why not torch DDP: DDP reduces after every backward unless each microbatch's forward *and*
backward run inside no_sync(), which the pipeline schedules interleave across microbatches
and model chunks, and it cannot reduce-scatter into the shards the distributed optimizer
owns. So, as Megatron does, every parameter's .grad is a view into one flat fp32 buffer,
cut into buckets of about `bucket_size` elements in reverse parameter order (the order in
which backward produces grads). During the last microbatch's backward (the schedule tells
us which one that is), a hook counts the grads that are final; when a bucket is complete
its all-reduce (or reduce-scatter, for the distributed optimizer) is launched
asynchronously, overlapping the rest of backward. finish_grad_sync() launches what is left
and waits. Each bucket is padded to a multiple of dp so it splits into equal shards.

Parameters whose grads need another reduction first (SP-replicated norm weights summed over
tp, the tied embedding summed over the first and last stage) go to trailing "deferred"
buckets that only finish_grad_sync() launches, after those reductions ran.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.comm import all_gather_flat, all_reduce_async, reduce_scatter_flat_async

DEFAULT_BUCKET_SIZE = 40_000_000  # elements, Megatron's default
GRAD_GROUP = "dp-cp"  # the replicas whose gradients are averaged (and over which ZeRO shards)


@dataclass
class Bucket:
    start: int
    end: int  # padded: (end - start) % dp == 0
    params: list[nn.Parameter] = field(default_factory=list)
    deferred: bool = False
    pending: int = 0
    work: dist.Work | None = None
    launched: bool = False

    def shard(self, dp_rank: int, dp: int) -> tuple[int, int]:
        size = (self.end - self.start) // dp
        return self.start + dp_rank * size, self.start + (dp_rank + 1) * size


class DataParallelGrads:
    """The grad buffer of one model chunk and its bucketed data-parallel reduction."""

    def __init__(self, module: nn.Module, bucket_size: int = DEFAULT_BUCKET_SIZE, shard: bool = False,
                 deferred: Callable[[nn.Parameter], bool] = lambda p: False) -> None:
        grid = parallel_state.get_grid()
        # Every parameter is replicated over dp and cp: one reduction over both (cp ranks hold
        # partial grads of other tokens of the same samples, see model_runner.microbatch_loss).
        self.dp, self.dp_rank, self.shard = grid.size(GRAD_GROUP), grid.index(GRAD_GROUP), shard
        params = [p for p in module.parameters() if p.requires_grad]
        ordered = [p for p in reversed(params) if not deferred(p)] + [p for p in reversed(params) if deferred(p)]
        self.buckets: list[Bucket] = []
        self.ranges: dict[nn.Parameter, tuple[int, int]] = {}
        offset = 0
        for p in ordered:
            bucket = self.buckets[-1] if self.buckets else None
            if bucket is None or bucket.deferred != deferred(p) or offset - bucket.start >= bucket_size:
                offset = self._close(bucket, offset)
                bucket = Bucket(offset, offset, deferred=deferred(p))
                self.buckets.append(bucket)
            self.ranges[p] = (offset, offset + p.numel())
            bucket.params.append(p)
            offset += p.numel()
        offset = self._close(self.buckets[-1] if self.buckets else None, offset)
        device = params[0].device if params else None
        self.grad_data = torch.zeros(offset, dtype=torch.float32, device=device)
        # The distributed optimizer updates a shard of the parameters and all-gathers the rest,
        # so the parameters live in one buffer too, laid out like their grads.
        self.param_data = torch.zeros(offset, dtype=torch.float32, device=device) if shard else None
        self.bucket_of = {p: b for b in self.buckets for p in b.params}
        for p, (lo, hi) in self.ranges.items():
            if self.param_data is not None:
                self.param_data[lo:hi].copy_(p.data.flatten())
                p.data = self.param_data[lo:hi].view_as(p)
            p.register_post_accumulate_grad_hook(self._grad_ready)
        self.sync_on_backward = False
        self.zero_grad()

    def _close(self, bucket: Bucket | None, offset: int) -> int:
        if bucket is None:
            return offset
        bucket.end = bucket.start + -(-(offset - bucket.start) // self.dp) * self.dp
        return bucket.end

    def zero_grad(self) -> None:
        """Zero the buffer and (re)point every .grad at its view; accumulation then happens in place."""
        self.grad_data.zero_()
        for p, (lo, hi) in self.ranges.items():
            p.grad = self.grad_data[lo:hi].view_as(p)

    def start_grad_sync_on_backward(self) -> None:
        """Called before this chunk's last microbatch backward: from now on complete buckets reduce."""
        for bucket in self.buckets:
            bucket.pending, bucket.launched, bucket.work = len(bucket.params), False, None
        self.sync_on_backward = True

    def _grad_ready(self, param: nn.Parameter) -> None:
        if not self.sync_on_backward:
            return
        bucket = self.bucket_of[param]
        bucket.pending -= 1
        if bucket.pending == 0 and not bucket.deferred:
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        bucket.launched = True
        data = self.grad_data[bucket.start:bucket.end]
        if self.dp == 1:
            return
        data.div_(self.dp)  # sum of per-replica means / (dp x cp) = mean over the global batch
        # Sharded: only this rank's shard of the bucket needs the sum (on gloo all of it gets it).
        bucket.work = reduce_scatter_flat_async(data, GRAD_GROUP) if self.shard else all_reduce_async(data, GRAD_GROUP)

    def finish_grad_sync(self) -> None:
        """Launch the buckets not yet launched (deferred ones, or all if backward never synced), wait for all."""
        for bucket in self.buckets:
            if not bucket.launched:
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
                bucket.work = None
        self.sync_on_backward = False

    def all_gather_params(self) -> None:
        """After a sharded optimizer step: every rank gets every shard of the updated parameters."""
        for bucket in self.buckets:
            all_gather_flat(self.param_data[bucket.start:bucket.end], GRAD_GROUP)
