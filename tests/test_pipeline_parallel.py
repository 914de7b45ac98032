"""Pipeline parallelism on gloo ranks: every schedule against one device and against each other.
The schedules' order, memory and bubble are swept in test_pipeline_schedules.py.

Spawns of 2, 4 and 8 ranks; parity tolerances and their reasons: tests/helpers/parity.py.
"""
from __future__ import annotations

import functools

import pytest

from helpers.parity import SCHEDULES, assert_parity, merge_ranks, run_steps
from helpers.tiny import tiny_config
from megatron_lite.config.layout import Layout
from megatron_lite.distributed.spawn import run_on_ranks

FAMILIES = ("llama", "gpt2")
VOCAB = 258
STEPS = 5
# (layout, clip_grad); clip_grad 0 turns clipping off.
CASES = [
    (Layout(pp=2, schedule="gpipe"), 1.0), (Layout(pp=2, schedule="1f1b"), 1.0), (Layout(pp=2, vpp=2), 1.0),
    (Layout(pp=2, schedule="1f1b"), 0.0),
    (Layout(pp=4, schedule="gpipe"), 1.0), (Layout(pp=4, schedule="1f1b"), 1.0), (Layout(pp=4, vpp=2), 1.0),
    (Layout(tp=2, pp=2, sp=True), 1.0), (Layout(tp=2, pp=2, vpp=2, sp=True), 1.0),
    (Layout(tp=2, pp=2, vpp=2, sp=True), 0.0),
    (Layout(tp=2, pp=4, sp=True), 1.0), (Layout(tp=2, pp=4, vpp=2, sp=True), 1.0),
]
# 1F1B with fewer microbatches (2) than stages (4): the warmup shrinks, nothing waits forever.
FEW_MICROBATCHES = Layout(pp=4, schedule="1f1b")


def pp_config(family: str, layout: Layout = Layout(), clip: float = 1.0, global_batch_size: int = 8):
    config = tiny_config(family, model=dict(num_layers=8, vocab_size=VOCAB), micro_batch_size=1,
                         global_batch_size=global_batch_size, train_iters=STEPS, clip_grad=clip)
    config = config.updated(parallel=layout.fields())
    return config


def pp_worker(world: int) -> dict:
    results = {(layout, clip): {f: run_steps(pp_config(f, layout, clip), STEPS) for f in FAMILIES}
               for layout, clip in CASES if layout.world_size == world}
    if world == FEW_MICROBATCHES.world_size:
        results["few_microbatches"] = run_steps(pp_config("llama", FEW_MICROBATCHES, global_batch_size=2), STEPS)
    return results


@functools.cache
def spawned(world: int) -> list[dict]:
    return run_on_ranks(pp_worker, world, world)


@functools.cache
def reference(family: str, clip: float = 1.0, global_batch_size: int = 8) -> dict:
    return run_steps(pp_config(family, clip=clip, global_batch_size=global_batch_size), STEPS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout, clip", CASES, ids=[layout.name + ("" if c else "-no-clip") for layout, c in CASES])
def test_pipeline_matches_single_device(layout: Layout, clip: float, family: str) -> None:
    ranks = spawned(layout.world_size)
    assert_parity(reference(family, clip), merge_ranks([r[(layout, clip)][family] for r in ranks]), VOCAB)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pp", [2, 4])
def test_schedules_agree_with_each_other(pp: int, family: str) -> None:
    ranks = spawned(pp)
    merged = {layout.schedule or "interleaved": merge_ranks([r[(layout, 1.0)][family] for r in ranks])
              for layout in (Layout(pp=pp, schedule="gpipe"), Layout(pp=pp, schedule="1f1b"), Layout(pp=pp, vpp=2))}
    for schedule in ("1f1b", "interleaved"):
        assert_parity(merged["gpipe"], merged[schedule], VOCAB, SCHEDULES)


def test_1f1b_with_fewer_microbatches_than_stages() -> None:
    assert_parity(reference("llama", global_batch_size=2), merge_ranks([r["few_microbatches"] for r in spawned(4)]),
                  VOCAB)
