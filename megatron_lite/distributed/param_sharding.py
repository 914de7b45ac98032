"""ZeRO-3 / FSDP: each rank stores 1/dp of the parameters; a unit's parameters (a transformer
layer, the embedding, the output head) are gathered just before its forward and freed after
it, gathered again just before its backward and freed as soon as backward has produced their
grads, which are reduce-scattered (data_parallel.py's shard_params and shard_grads buckets).

The model names its units (GPTModel.param_units), in forward order: where each starts and
ends (module hooks), and whether its backward reads its parameters (an embedding's backward
needs only the token ids, so it is not gathered again). Before a unit's forward the next
unit's gather is started, so it overlaps this unit's compute; before a unit's backward,
the previous one's. With pipeline parallelism every microbatch's forward and backward gather
again (a stage holds many microbatches in flight, and keeping a gathered copy per microbatch
would be the unsharded memory): per step and rank, m forwards and m backwards of gathers and m
reduce-scatters, m the microbatches.

Under activation recomputation backward replays a recomputed region's forward, and with it
the forward hooks of the units inside (full recomputation replays whole layers; selective
recomputation replays parts of one layer, which fire no unit hook and find their layer
gathered for its backward). A replayed unit is gathered if it is not already (a group of
layers replays all of them at the start of its last layer's backward), is not freed after the
replayed forward (its backward follows and reads the parameters; the grad buffers free them
when its grads are in, as without recomputation) and prefetches nothing. So recomputation
gathers no more than backward without it, and holds no more at once but a replayed group.

Why not torch's FSDP2 (`fully_shard`, which runs on gloo here): it makes parameters DTensors
and owns their gradients, reduce-scattering them in its own hooks in the parameters' dtype;
our fp32 main-grad buffer, the distributed optimizer's flat shards and the checkpoint format
built on them, the expert buffers over edp, the tensor-parallel placements and resharding
all assume the flat buckets. So ZeRO-3 extends those buckets, as Megatron-FSDP does.
"""
from __future__ import annotations

import torch

from megatron_lite.distributed.data_parallel import Bucket, DataParallelGrads
from megatron_lite.param_unit import ParamUnit
from megatron_lite.tensor_parallel.random import replaying


class ShardedParams:
    """The gather/free hooks of one model chunk's units over that chunk's grad buffers."""

    def __init__(self, units: list[ParamUnit], buffers: list[DataParallelGrads]) -> None:
        self.units = units
        owner = {p: (buf, buf.bucket_of[p]) for buf in buffers for p in buf.bucket_of}
        # Each unit's ZeRO-3 buckets, in order; a tied weight's bucket may serve two units.
        self.buckets: list[list[tuple[DataParallelGrads, Bucket]]] = []
        for unit in units:
            seen: dict[int, tuple[DataParallelGrads, Bucket]] = {}
            for p in unit.params:
                if p in owner and owner[p][1].shard_params:
                    seen.setdefault(id(owner[p][1]), owner[p])
            self.buckets.append(list(seen.values()))
        self.users: dict[int, int] = {}  # forward: how many running units hold each bucket (by id)
        for i, unit in enumerate(units):
            unit.enter.register_forward_pre_hook(lambda *_, i=i: self._before_forward(i))
            unit.exit.register_forward_hook(lambda _module, _args, output, i=i: self._after_forward(i, output))

    def _gather(self, i: int, wait: bool) -> None:
        for buf, bucket in self.buckets[i]:
            buf.gather_params(bucket)
        if wait:
            for buf, bucket in self.buckets[i]:
                buf.wait_params(bucket)

    def _before_forward(self, i: int) -> None:
        self._gather(i, wait=True)
        if replaying():
            # Backward replays the unit's forward (recomputation, module docstring): gathered above
            # unless it was already. No user count: torch's checkpoint may stop a replay once it has
            # what backward needs, before the unit's forward hook, so a count could leak. No prefetch:
            # the units after it are done with. Per unit, not per microbatch: every replay's saved
            # tensors are views of the unit's one gathered copy (a copy per microbatch in flight would
            # be, under pipeline parallelism, the unsharded memory).
            return
        for buf, bucket in self.buckets[i]:
            self.users[id(bucket)] = self.users.get(id(bucket), 0) + 1
        if i + 1 < len(self.units):
            self._gather(i + 1, wait=False)  # prefetch: overlaps this unit's forward

    def _after_forward(self, i: int, output: object) -> None:
        if replaying():  # its backward follows and reads the parameters; the replayed output is not in the graph
            return
        for buf, bucket in self.buckets[i]:
            self.users[id(bucket)] -= 1
            if self.users[id(bucket)] == 0:
                buf.free_params(bucket)
        if self.units[i].backward_reads and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad, i=i: self._before_backward(i))

    def _before_backward(self, i: int) -> None:
        """The unit's output grad is computed: its backward starts next. Its buckets are freed by
        the grad buffers once all their grads are in (data_parallel.py)."""
        self._gather(i, wait=True)
        earlier = next((j for j in range(i - 1, -1, -1) if self.units[j].backward_reads), None)
        if earlier is not None:
            self._gather(earlier, wait=False)  # prefetch: overlaps this unit's backward
