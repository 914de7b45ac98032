"""Data parallelism, the distributed optimizer and full 3D layouts against one device, plus the
data-parallel communication volume and optimizer memory.

Three spawns (2, 4 and 8 ranks); parity tolerances and their reasons: tests/helpers/parity.py.
"""
from __future__ import annotations

import functools

import pytest
import torch

from helpers.parity import assert_parity, merge_ranks, run_steps
from helpers.tiny import tiny_config
from megatron_lite import parallel_state
from megatron_lite.comm import METER
from megatron_lite.config.layout import Layout
from megatron_lite.data.random_tokens import RandomTokens
from megatron_lite.distributed.data_parallel import GRAD_GROUP, DataParallelGrads
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.optimizer.optimizer import state_bytes
from megatron_lite.training.loop import rank_microbatches, train_step
from megatron_lite.training.parallelize import parallelize

VOCAB = 258
STEPS = 5
BUCKET = 3000  # elements: several buckets even for the tiny model
FAMILIES = ("llama", "gpt2")
# (layout, clip_grad): 0.5 is below the grad norm of these steps, so clipping is active in every step; 0 is off.
CASES = [
    (Layout(dp=2), 0.5), (Layout(dp=2, distopt=True), 0.5), (Layout(dp=2), 0.0),
    (Layout(dp=4), 0.5), (Layout(dp=4, distopt=True), 0.5), (Layout(dp=4, distopt=True), 0.0),
    (Layout(tp=2, pp=2, dp=2), 0.5), (Layout(tp=2, pp=2, dp=2, sp=True, distopt=True), 0.5),
    (Layout(tp=2, pp=2, dp=2, vpp=2, sp=True, distopt=True), 0.5), (Layout(tp=2, pp=2, dp=2, vpp=2), 0.5),
    (Layout(tp=2, pp=2, dp=2, sp=True, distopt=True), 0.0),
    # The parameter all-gather left in flight after each step and waited for per layer.
    (Layout(dp=2, distopt=True, overlap=True), 0.5),
    (Layout(tp=2, pp=2, dp=2, vpp=2, sp=True, distopt=True, overlap=True), 0.5),
]


def dp_config(family: str, layout: Layout = Layout(), clip: float = 0.5):
    config = tiny_config(family, model=dict(num_layers=4, vocab_size=VOCAB), micro_batch_size=1,
                         global_batch_size=8, train_iters=STEPS, clip_grad=clip)
    return config.updated(parallel={**layout.fields(), "ddp_bucket_size": BUCKET})


def one_step_accounting(distributed: bool) -> dict:
    """Meter counts, buffer sizes, optimizer state and overlap for one step at tp = pp = 1."""
    world = parallel_state.get_grid().world_size
    config = dp_config("llama", Layout(dp=world, distopt=distributed)).updated(
        train={"global_batch_size": 2 * world})  # 2 microbatches per replica
    parallel_state.initialize_model_parallel(config.parallel)
    model = parallelize(config, torch.device("cpu"))
    buffer = model.grad_buffers[0]
    launched_early = []
    finish = DataParallelGrads.finish_grad_sync

    def counting_finish(self: DataParallelGrads) -> None:
        launched_early.append(sum(b.launched for b in self.buckets))
        finish(self)

    DataParallelGrads.finish_grad_sync = counting_finish
    batches = list(rank_microbatches(RandomTokens(VOCAB, config.model.seq_length), 0, config, torch.device("cpu")))
    METER.reset()
    try:
        train_step(model, batches, 1, config, torch.device("cpu"))
    finally:
        DataParallelGrads.finish_grad_sync = finish
    return {"bytes": dict(METER.bytes), "calls": dict(METER.calls),
            "buffer": buffer.grad_data.numel(), "buckets": len(buffer.buckets),
            "params": sum(p.numel() for p in model.chunks[0].parameters()),
            "state": state_bytes(model.optimizer.optimizer), "launched_early": launched_early[0]}


def dp_worker(world: int) -> dict:
    results = {(layout, clip): {f: run_steps(dp_config(f, layout, clip), STEPS) for f in FAMILIES}
               for layout, clip in CASES if layout.world_size == world}
    if world in (2, 4):
        results["accounting"] = {d: one_step_accounting(d) for d in (False, True)}
    return results


@functools.cache
def spawned(world: int) -> list[dict]:
    return run_on_ranks(dp_worker, world, world)


@functools.cache
def reference(family: str, clip: float) -> dict:
    return run_steps(dp_config(family, clip=clip), STEPS)


@pytest.mark.parametrize("layout, clip", CASES,
                         ids=[f"{layout.name}-{'clip' if c else 'no-clip'}" for layout, c in CASES])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_single_device(layout: Layout, clip: float, family: str) -> None:
    ranks = spawned(layout.world_size)
    assert_parity(reference(family, clip), merge_ranks([r[(layout, clip)][family] for r in ranks]), VOCAB)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("distributed", [False, True], ids=["all-reduce", "distopt"])
def test_data_parallel_communication_is_analytic(world: int, distributed: bool) -> None:
    acc = spawned(world)[0]["accounting"][distributed]
    # The grad buffer holds every parameter once, each bucket padded to a multiple of dp.
    assert acc["params"] <= acc["buffer"] < acc["params"] + world * acc["buckets"]
    grads = 4 * acc["buffer"]  # fp32
    # Grads (and, sharded, the grad norm's partial squares) go over the dp x cp group, which at
    # cp 1 has the dp group's members; the step's loss (fp64) is averaged over dp.
    G = GRAD_GROUP
    if distributed:
        expected = {("reduce_scatter", G): grads, ("all_gather", G): grads, ("all_reduce", G): 4,
                    ("all_reduce", "dp"): 8}
    else:
        expected = {("all_reduce", G): grads, ("all_reduce", "dp"): 8}
    assert acc["bytes"] == expected
    # One reduction per bucket per step, however many microbatches.
    if distributed:
        assert acc["calls"][("reduce_scatter", G)] == acc["calls"][("all_gather", G)] == acc["buckets"]
    else:
        assert acc["calls"][("all_reduce", G)] == acc["buckets"]
    # Buckets start during the last backward, before finish_grad_sync: the reduction overlaps.
    assert acc["launched_early"] >= acc["buckets"] - 2


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_optimizer_shards_adam_state(world: int) -> None:
    for rank in spawned(world):
        full, sharded = rank["accounting"][False]["state"], rank["accounting"][True]["state"]
        # Adam keeps 2 fp32 moments per element: 8 bytes per parameter unsharded.
        assert full == 8 * rank["accounting"][False]["params"]
        assert abs(sharded - full / world) <= 8 * world * rank["accounting"][True]["buckets"]
