"""Data-parallel gradient reduction: a grad buffer per model chunk, reduced in buckets that start
while backward is still running, and the sharding of ZeRO-1/2/3 over those buckets.

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

Sharding more (Megatron-FSDP's strategies on the same buckets):
- shard_grads (ZeRO-2): only this rank's shard of each bucket's grads persists. In every
  microbatch's backward a bucket's grads land in a transient full-size buffer, which is
  reduce-scattered as soon as the bucket is complete; finish_microbatch() adds this rank's
  shard to the persistent one and frees the rest. dp x the reduce-scatters of ZeRO-1 for
  1/dp of its grad memory.
- shard_params (ZeRO-3): only this rank's shard of the parameters persists too; each bucket
  has a full-size tensor the parameters are views of, whose storage exists only between
  gather_params() and free_params() (distributed/param_sharding.py decides when, layer by
  layer). A bucket is freed as soon as backward has produced all its grads.
The buffers' flat storage (grad_data, param_data) holds what persists: a sharded bucket's
shard, an unsharded bucket whole; `ranges` index the full, unsharded layout.

Parameters whose grads need another reduction first (SP-replicated norm weights summed over
tp, the tied embedding summed over the first and last stage) go to trailing "deferred"
buckets that only finish_grad_sync() launches, after those reductions ran. They are never
sharded beyond ZeRO-1: the sum over the first and last stage cannot run per microbatch,
when the two stages are at different microbatches.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.comm import all_gather_flat_async, all_reduce_async, reduce_scatter_flat_async

T = TypeVar("T")
DEFAULT_BUCKET_SIZE = 40_000_000  # elements, Megatron's default
GRAD_GROUP = "dp-cp"  # the replicas whose gradients are averaged (and over which ZeRO shards)


@dataclass
class Bucket:
    start: int
    end: int  # padded: (end - start) % dp == 0
    params: list[nn.Parameter] = field(default_factory=list)
    deferred: bool = False
    shard_grads: bool = False  # ZeRO-2/3: only this rank's shard of the grads persists
    shard_params: bool = False  # ZeRO-3: only this rank's shard of the parameters persists
    grad_offset: int = 0  # where the bucket's persistent grads (its shard, or all of it) start in grad_data
    param_offset: int = 0  # likewise in param_data
    pending: int = 0
    work: dist.Work | None = None
    launched: bool = False
    gather: dist.Work | None = None  # a parameter all-gather in flight
    grad_full: torch.Tensor | None = None  # ZeRO-2/3: the full grads during one microbatch's backward
    param_full: torch.Tensor | None = None  # ZeRO-3: the gathered parameters (storage freed between uses)
    gathered: bool = False  # ZeRO-3: param_full holds the parameters (or is being filled: see gather)

    @property
    def size(self) -> int:
        return self.end - self.start

    def shard(self, dp_rank: int, dp: int) -> tuple[int, int]:
        size = self.size // dp
        return self.start + dp_rank * size, self.start + (dp_rank + 1) * size


def materialized(param: torch.Tensor) -> bool:
    """False for a ZeRO-3 parameter whose full storage is freed (only its shard exists)."""
    return param.numel() == 0 or param.untyped_storage().nbytes() > 0


def buffer_order(params: list[T], deferred: Callable[[T], bool]) -> list[T]:
    """The order of a grad buffer: parameters in reverse (the order backward produces their grads),
    those with partial grads (`deferred`) last, in trailing buckets."""
    return [p for p in reversed(params) if not deferred(p)] + [p for p in reversed(params) if deferred(p)]


def bucket_spans(params: list[tuple[int, bool, Hashable]], bucket_size: int,
                 dp: int) -> list[tuple[int, int, list[int]]]:
    """How a grad buffer cuts its parameters, given in buffer order as (elements, deferred, unit),
    into buckets: (start, padded end, the parameters' indices) each. A bucket closes once it holds
    `bucket_size` elements, before a deferred parameter follows a plain one, and before a
    parameter of another unit (unit None: no unit boundary); its end is padded to a multiple of
    dp so that it splits into equal shards. The planner (megatron_lite/planner/) counts the bytes
    of a layout with this same function."""
    spans: list[tuple[int, int, list[int]]] = []
    start = offset = 0
    members: list[int] = []
    for i, (numel, deferred, unit) in enumerate(params):
        if members:
            last_deferred, last_unit = params[members[-1]][1:]
            if (deferred != last_deferred or offset - start >= bucket_size
                    or (unit is not None and unit != last_unit)):
                end = start + -(-(offset - start) // dp) * dp
                spans.append((start, end, members))
                start = offset = end
                members = []
        members.append(i)
        offset += numel
    if members:
        spans.append((start, start + -(-(offset - start) // dp) * dp, members))
    return spans


class DataParallelGrads:
    """The grad buffer of one model chunk and its bucketed data-parallel reduction."""

    def __init__(self, module: nn.Module, bucket_size: int = DEFAULT_BUCKET_SIZE, shard: bool = False,
                 deferred: Callable[[nn.Parameter], bool] = lambda p: False, overlap_param_gather: bool = False,
                 select: Callable[[nn.Parameter], bool] = lambda p: True, group: str = GRAD_GROUP,
                 divisor: int | None = None, shard_grads: bool = False, shard_params: bool = False,
                 unit_of: Callable[[nn.Parameter], Hashable] | None = None, flat_params: bool = False,
                 initialize: Callable[[nn.Parameter, torch.Tensor, int, int], None] | None = None) -> None:
        """The parameters of `module` that `select` picks, summed over `group` and divided by
        `divisor` (default: dp x cp). Dense parameters are replicated over dp and cp: one
        reduction over both (cp ranks hold partial grads of other tokens of the same samples,
        see model_runner.microbatch_loss), a mean over the replicas. Experts are replicated over
        "edp", whose sum holds every dp x cp replica's tokens' contributions (the all-to-all
        brought them), so they divide by dp x cp too (see parallelize.expert_grad_divisor).
        `shard`: the distributed optimizer owns one shard of each bucket; `shard_grads`,
        `shard_params`: ZeRO-2 and ZeRO-3 (module docstring). `unit_of`: no bucket holds
        parameters of two units (ZeRO-3 gathers and frees whole buckets per unit). `flat_params`:
        the parameters are views of one flat buffer, `param_data`, as under `shard`, without
        sharding anything (the parameter server sends and receives them as one message).
        Parameters without storage yet (not `materialized`: ZeRO-3 builds its buffers so) get their values
        from `initialize(param, out, lo, hi)`, which fills `out` with those of the parameter's flat elements
        [lo, hi): a ZeRO-3 bucket draws only this rank's shard, so no rank ever holds a full parameter."""
        grid = parallel_state.get_grid()
        self.group, self.dp, self.dp_rank, self.shard = group, grid.size(group), grid.index(group), shard
        self.divisor = grid.size(GRAD_GROUP) if divisor is None else divisor
        params = [p for p in module.parameters() if p.requires_grad and select(p)]
        ordered = buffer_order(params, deferred)
        self.buckets: list[Bucket] = []
        self.ranges: dict[nn.Parameter, tuple[int, int]] = {}
        spans = bucket_spans([(p.numel(), deferred(p), None if unit_of is None or deferred(p) else unit_of(p))
                              for p in ordered], bucket_size, self.dp)
        for start, end, members in spans:
            first = ordered[members[0]]
            bucket = Bucket(start, end, deferred=deferred(first), shard_grads=shard_grads and not deferred(first),
                            shard_params=shard_params and not deferred(first))
            offset = start
            for i in members:
                self.ranges[ordered[i]] = (offset, offset + ordered[i].numel())
                bucket.params.append(ordered[i])
                offset += ordered[i].numel()
            self.buckets.append(bucket)
        self.size = spans[-1][1] if spans else 0
        device = params[0].device if params else None
        dtype = params[0].dtype if params else torch.float32
        grad_size = param_size = 0
        for bucket in self.buckets:
            bucket.grad_offset, bucket.param_offset = grad_size, param_size
            grad_size += bucket.size // self.dp if bucket.shard_grads else bucket.size
            param_size += bucket.size // self.dp if bucket.shard_params else bucket.size
        self.grad_data = torch.zeros(grad_size, dtype=torch.float32, device=device)
        self.param_data = torch.zeros(param_size, dtype=dtype, device=device) if shard or flat_params else None
        self.bucket_of = {p: b for b in self.buckets for p in b.params}
        for bucket in self.buckets:
            if bucket.shard_params:
                bucket.param_full = torch.zeros(bucket.size, dtype=dtype, device=device)
            drawn = not all(materialized(p) for p in bucket.params)  # parallelize builds all or none so
            for p in bucket.params:
                if self.param_data is not None:
                    self._place(bucket, p, initialize)
                if not bucket.shard_grads:
                    p.main_grad = self.grad_view(bucket, *self.ranges[p]).view_as(p)
                p.register_post_accumulate_grad_hook(self._grad_ready)
            if bucket.shard_params:  # keep this rank's shard, free the rest
                lo, hi = bucket.shard(self.dp_rank, self.dp)
                if not drawn:
                    self.bucket_params(bucket).copy_(bucket.param_full[lo - bucket.start:hi - bucket.start])
                bucket.param_full.untyped_storage().resize_(0)
        self.sync_on_backward = False
        self.overlap_param_gather = overlap_param_gather
        if overlap_param_gather:
            self._register_param_gather_waits(module)
        self.zero_grad()

    def _place(self, bucket: Bucket, p: nn.Parameter,
               initialize: Callable[[nn.Parameter, torch.Tensor, int, int], None] | None) -> None:
        """Put p's values where the buffer keeps them: all of them (a bucket it does not shard, or ZeRO-3's full
        tensor, whose shard is copied out after), or, for a parameter without storage, only those of the
        elements this rank keeps, drawn by `initialize`."""
        lo, hi = self.ranges[p]
        full = bucket.param_full if bucket.shard_params else self.bucket_params(bucket)
        view = full[lo - bucket.start:hi - bucket.start]
        if not materialized(p):
            first = self._first_held(bucket, bucket.shard_params)
            kept_lo, kept_hi = max(lo, first), min(hi, first + self.bucket_params(bucket).numel())
            if kept_lo < kept_hi:
                with torch.no_grad():
                    initialize(p, self.bucket_params(bucket)[kept_lo - first:kept_hi - first], kept_lo - lo,
                               kept_hi - lo)
        else:
            view.copy_(p.data.flatten())
        p.data = view.view_as(p)

    def bucket_grads(self, bucket: Bucket) -> torch.Tensor:
        """The bucket's persistent grads in grad_data: this rank's shard (ZeRO-2/3), or all of it."""
        return self.grad_data[bucket.grad_offset:bucket.grad_offset + (bucket.size // self.dp if bucket.shard_grads
                                                                        else bucket.size)]

    def bucket_params(self, bucket: Bucket) -> torch.Tensor:
        """The bucket's persistent parameters in param_data: this rank's shard (ZeRO-3), or all of it."""
        return self.param_data[bucket.param_offset:bucket.param_offset + (bucket.size // self.dp
                                                                           if bucket.shard_params else bucket.size)]

    def _first_held(self, bucket: Bucket, sharded: bool) -> int:
        """The first element (in the full layout) that the bucket's persistent storage holds."""
        return bucket.shard(self.dp_rank, self.dp)[0] if sharded else bucket.start

    def grad_view(self, bucket: Bucket, lo: int, hi: int) -> torch.Tensor:
        """The persistent grads of elements [lo, hi) (full layout) of `bucket`, which it must hold."""
        first = self._first_held(bucket, bucket.shard_grads)
        return self.bucket_grads(bucket)[lo - first:hi - first]

    def param_view(self, bucket: Bucket, lo: int, hi: int) -> torch.Tensor:
        """The persistent parameters of elements [lo, hi) (full layout) of `bucket`, which it must hold."""
        first = self._first_held(bucket, bucket.shard_params)
        return self.bucket_params(bucket)[lo - first:hi - first]

    def zero_grad(self) -> None:
        """Zero the buffer; an fp32 parameter's .grad is (re)pointed at its view, so backward
        accumulates in place, a half-precision one's is dropped (_grad_ready moves it over).
        Under ZeRO-2/3 every grad is dropped: _grad_ready moves it to its bucket's full buffer."""
        self.grad_data.zero_()
        for bucket in self.buckets:
            for p in bucket.params:
                p.grad = p.main_grad if p.dtype == torch.float32 and not bucket.shard_grads else None
            if bucket.shard_grads:
                bucket.pending, bucket.launched, bucket.work, bucket.grad_full = len(bucket.params), False, None, None

    def start_grad_sync_on_backward(self) -> None:
        """Called before this chunk's last microbatch backward: from now on complete buckets reduce."""
        for bucket in self.buckets:
            if not bucket.shard_grads:
                bucket.pending, bucket.launched, bucket.work = len(bucket.params), False, None
        self.sync_on_backward = True

    def _grad_ready(self, param: nn.Parameter) -> None:
        bucket = self.bucket_of[param]
        if bucket.shard_grads:
            if bucket.grad_full is None:
                bucket.grad_full = torch.zeros(bucket.size, dtype=torch.float32, device=self.grad_data.device)
            lo, hi = self.ranges[param]
            bucket.grad_full[lo - bucket.start:hi - bucket.start].add_(param.grad.flatten())
            param.grad = None
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch(bucket)
                if bucket.shard_params:  # every use of its parameters in this backward is done
                    self.free_params(bucket)
            return
        if param.dtype != torch.float32:  # bf16/fp16: accumulate in fp32, free the half grad
            param.main_grad.add_(param.grad)
            param.grad = None
        if not self.sync_on_backward:
            return
        bucket.pending -= 1
        if bucket.pending == 0 and not bucket.deferred:
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        bucket.launched = True
        data = bucket.grad_full if bucket.shard_grads else self.bucket_grads(bucket)
        if self.divisor > 1:
            data.div_(self.divisor)  # sum of per-replica means / replicas = mean over the global batch
        if self.dp == 1:
            return
        # Sharded: only this rank's shard of the bucket needs the sum (on gloo all of it gets it).
        sharded = self.shard or bucket.shard_grads
        bucket.work = reduce_scatter_flat_async(data, self.group) if sharded else all_reduce_async(data, self.group)

    def finish_microbatch(self) -> None:
        """ZeRO-2/3, after each backward of this chunk: reduce-scatter what has not been (buckets
        with a parameter that got no grad), add this rank's shard of every bucket to the persistent
        grads, free the full buffers. A no-op for unsharded grads."""
        sharded = [b for b in self.buckets if b.shard_grads]
        for bucket in sharded:
            if not bucket.launched:
                if bucket.grad_full is None:
                    bucket.grad_full = torch.zeros(bucket.size, dtype=torch.float32, device=self.grad_data.device)
                self._launch(bucket)
            if bucket.shard_params and bucket.gathered:
                self.free_params(bucket)
        for bucket in sharded:
            if bucket.work is not None:
                bucket.work.wait()
            lo, hi = bucket.shard(self.dp_rank, self.dp)
            self.bucket_grads(bucket).add_(bucket.grad_full[lo - bucket.start:hi - bucket.start])
            bucket.pending, bucket.launched, bucket.work, bucket.grad_full = len(bucket.params), False, None, None

    def finish_grad_sync(self) -> None:
        """Launch the buckets not yet launched (deferred ones, or all if backward never synced), wait for all."""
        unsharded = [b for b in self.buckets if not b.shard_grads]
        for bucket in unsharded:
            if not bucket.launched:
                self._launch(bucket)
        for bucket in unsharded:
            if bucket.work is not None:
                bucket.work.wait()
                bucket.work = None
        self.sync_on_backward = False

    def gather_params(self, bucket: Bucket) -> None:
        """ZeRO-3: start filling the bucket's full parameters from every rank's shard (no-op if
        they are there or on their way); wait_params before reading them."""
        if bucket.gathered:
            return
        bucket.param_full.untyped_storage().resize_(bucket.size * bucket.param_full.element_size())
        lo, hi = bucket.shard(self.dp_rank, self.dp)
        bucket.param_full[lo - bucket.start:hi - bucket.start].copy_(self.bucket_params(bucket))
        bucket.gather = all_gather_flat_async(bucket.param_full, self.group)
        bucket.gathered = True

    def wait_params(self, bucket: Bucket) -> None:
        if bucket.gather is not None:
            bucket.gather.wait()
            bucket.gather = None

    def free_params(self, bucket: Bucket) -> None:
        """ZeRO-3: drop the bucket's full parameters (its shard stays in param_data)."""
        self.wait_params(bucket)
        bucket.param_full.untyped_storage().resize_(0)
        bucket.gathered = False

    def all_gather_params(self) -> None:
        """After a sharded optimizer step: every rank gets every shard of the updated parameters,
        now, or with overlap_param_gather in the background (each forward pre-hook waits for its
        own). ZeRO-3 buckets are left sharded: their next use gathers them."""
        for bucket in reversed(self.buckets):  # forward order: the first layers' parameters first
            if not bucket.shard_params:
                bucket.gather = all_gather_flat_async(self.bucket_params(bucket), self.group)
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
            self.wait_params(bucket)

    def finish_param_gather(self) -> None:
        """Wait for every parameter all-gather in flight: before anything reads the weights outside
        a training forward (evaluation, a checkpoint)."""
        self._wait_param_gather(self.buckets)
