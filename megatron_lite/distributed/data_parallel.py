"""Data-parallel gradient reduction: a contiguous grad buffer per model chunk, reduced in buckets
that start while backward is still running.

Why not torch DDP: DDP reduces after every backward unless each microbatch's forward *and*
backward run inside no_sync(), which the pipeline schedules interleave across microbatches
and model chunks, and it cannot reduce-scatter into the shards the distributed optimizer
owns. So, as Megatron does, every parameter's gradient lives in one flat fp32 buffer (its
`main_grad` view; an fp32 parameter's .grad is that same view, so backward accumulates in
place, and a bf16/fp16 parameter's grad is added into it as soon as backward produces it),
cut into buckets of about `bucket_size` elements in reverse parameter order (the order in
which backward produces grads). During the last microbatch's backward (the schedule tells
us which one that is), a hook counts the grads that are final; when a bucket is complete
its all-reduce (or reduce-scatter, for the distributed optimizer) is launched
asynchronously, overlapping the rest of backward. finish_grad_sync() launches what is left
and waits. Each bucket is padded to a multiple of dp so it splits into equal shards.

With the distributed optimizer the parameters live in one flat buffer too, in their own
dtype (bf16 under --bf16: half the all-gather traffic of fp32), laid out like the grads.
With overlap_param_gather the all-gather after the step is asynchronous per bucket, and a
forward pre-hook on each module waits for the buckets of its parameters only, so gathering
later buckets overlaps computing with earlier ones.

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
from megatron_lite.comm import all_gather_flat_async, all_reduce_async, reduce_scatter_flat_async

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
    gather: dist.Work | None = None  # the parameter all-gather in flight (overlap_param_gather)

    def shard(self, dp_rank: int, dp: int) -> tuple[int, int]:
        size = (self.end - self.start) // dp
        return self.start + dp_rank * size, self.start + (dp_rank + 1) * size


class DataParallelGrads:
    """The grad buffer of one model chunk and its bucketed data-parallel reduction."""

    def __init__(self, module: nn.Module, bucket_size: int = DEFAULT_BUCKET_SIZE, shard: bool = False,
                 deferred: Callable[[nn.Parameter], bool] = lambda p: False, overlap_param_gather: bool = False,
                 select: Callable[[nn.Parameter], bool] = lambda p: True, group: str = GRAD_GROUP,
                 divisor: int | None = None) -> None:
        """The parameters of `module` that `select` picks, summed over `group` and divided by
        `divisor` (default: dp x cp). Dense parameters are replicated over dp and cp: one
        reduction over both (cp ranks hold partial grads of other tokens of the same samples,
        see model_runner.microbatch_loss), a mean over the replicas. Experts are replicated over
        "edp", whose sum holds every dp x cp replica's tokens' contributions (the all-to-all
        brought them), so they divide by dp x cp too (see parallelize.expert_grad_divisor)."""
        grid = parallel_state.get_grid()
        self.group, self.dp, self.dp_rank, self.shard = group, grid.size(group), grid.index(group), shard
        self.divisor = grid.size(GRAD_GROUP) if divisor is None else divisor
        params = [p for p in module.parameters() if p.requires_grad and select(p)]
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
        dtype = params[0].dtype if params else torch.float32
        self.param_data = torch.zeros(offset, dtype=dtype, device=device) if shard else None
        self.bucket_of = {p: b for b in self.buckets for p in b.params}
        for p, (lo, hi) in self.ranges.items():
            if self.param_data is not None:
                self.param_data[lo:hi].copy_(p.data.flatten())
                p.data = self.param_data[lo:hi].view_as(p)
            p.main_grad = self.grad_data[lo:hi].view_as(p)
            p.register_post_accumulate_grad_hook(self._grad_ready)
        self.sync_on_backward = False
        self.overlap_param_gather = overlap_param_gather
        if overlap_param_gather:
            self._register_param_gather_waits(module)
        self.zero_grad()

    def _close(self, bucket: Bucket | None, offset: int) -> int:
        if bucket is None:
            return offset
        bucket.end = bucket.start + -(-(offset - bucket.start) // self.dp) * self.dp
        return bucket.end

    def zero_grad(self) -> None:
        """Zero the buffer; an fp32 parameter's .grad is (re)pointed at its view, so backward
        accumulates in place, a half-precision one's is dropped (_grad_ready moves it over)."""
        self.grad_data.zero_()
        for p in self.ranges:
            p.grad = p.main_grad if p.dtype == torch.float32 else None

    def start_grad_sync_on_backward(self) -> None:
        """Called before this chunk's last microbatch backward: from now on complete buckets reduce."""
        for bucket in self.buckets:
            bucket.pending, bucket.launched, bucket.work = len(bucket.params), False, None
        self.sync_on_backward = True

    def _grad_ready(self, param: nn.Parameter) -> None:
        if param.dtype != torch.float32:  # bf16/fp16: accumulate in fp32, free the half grad
            param.main_grad.add_(param.grad)
            param.grad = None
        if not self.sync_on_backward:
            return
        bucket = self.bucket_of[param]
        bucket.pending -= 1
        if bucket.pending == 0 and not bucket.deferred:
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        bucket.launched = True
        data = self.grad_data[bucket.start:bucket.end]
        if self.divisor > 1:
            data.div_(self.divisor)  # sum of per-replica means / replicas = mean over the global batch
        if self.dp == 1:
            return
        # Sharded: only this rank's shard of the bucket needs the sum (on gloo all of it gets it).
        bucket.work = reduce_scatter_flat_async(data, self.group) if self.shard else all_reduce_async(data, self.group)

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
        """After a sharded optimizer step: every rank gets every shard of the updated parameters,
        now, or with overlap_param_gather in the background (each forward pre-hook waits for its own)."""
        for bucket in reversed(self.buckets):  # forward order: the first layers' parameters first
            bucket.gather = all_gather_flat_async(self.param_data[bucket.start:bucket.end], self.group)
        if not self.overlap_param_gather:
            self.finish_param_gather()

    def _register_param_gather_waits(self, module: nn.Module) -> None:
        """Each layer (a child of a ModuleDict or ModuleList) waits for its own buckets before its
        forward; the chunk waits for the rest (embedding, final norm, output layer, which may be
        read without being called, as a tied output layer is) before its own."""
        layers = [layer for child in module.children() if isinstance(child, (nn.ModuleDict, nn.ModuleList))
                  for layer in child.children()]
        in_layers = {p for layer in layers for p in layer.parameters()}
        for unit, params in [(module, [p for p in module.parameters() if p not in in_layers]),
                             *[(layer, list(layer.parameters())) for layer in layers]]:
            ids = {id(self.bucket_of[p]) for p in params if p in self.bucket_of}
            buckets = [b for b in self.buckets if id(b) in ids]
            if buckets:
                unit.register_forward_pre_hook(lambda *_, buckets=buckets: self._wait_param_gather(buckets))

    @torch.compiler.disable  # a host-side wait: under --compile, outside the layer's graph
    def _wait_param_gather(self, buckets: list[Bucket]) -> None:
        for bucket in buckets:
            if bucket.gather is not None:
                bucket.gather.wait()
                bucket.gather = None

    def finish_param_gather(self) -> None:
        """Wait for every parameter all-gather in flight: before anything reads the weights outside
        a training forward (evaluation, a checkpoint)."""
        self._wait_param_gather(self.buckets)
