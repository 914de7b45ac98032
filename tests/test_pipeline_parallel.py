"""Pipeline parallelism on gloo ranks: every schedule against one device and against each other.
The schedules' order, memory and bubble are swept in test_pipeline_schedules.py.

Spawns of 2, 4 and 8 ranks; parity tolerances and their reasons: tests/parity.py.
"""
from __future__ import annotations

import functools

import pytest

from megatron_lite.distributed.spawn import run_on_ranks
from parity import SCHEDULES, assert_parity, merge_ranks, run_steps
from tiny import tiny_config

FAMILIES = ("llama", "gpt2")
VOCAB = 258
STEPS = 5
# (tp, pp, vpp, schedule, sequence parallel, clip_grad) per world size; clip_grad 0 turns clipping off.
LAYOUTS = {
    2: [(1, 2, 1, "gpipe", False, 1.0), (1, 2, 1, "1f1b", False, 1.0), (1, 2, 2, "interleaved", False, 1.0),
        (1, 2, 1, "1f1b", False, 0.0)],
    4: [(1, 4, 1, "gpipe", False, 1.0), (1, 4, 1, "1f1b", False, 1.0), (1, 4, 2, "interleaved", False, 1.0),
        (2, 2, 1, "1f1b", True, 1.0), (2, 2, 2, "interleaved", True, 1.0), (2, 2, 2, "interleaved", True, 0.0)],
    8: [(2, 4, 1, "1f1b", True, 1.0), (2, 4, 2, "interleaved", True, 1.0)],
}


def pp_config(family: str, tp: int = 1, pp: int = 1, vpp: int = 1, schedule: str | None = None, sp: bool = False,
              clip: float = 1.0, global_batch_size: int = 8):
    config = tiny_config(family, model=dict(num_layers=8, vocab_size=VOCAB), micro_batch_size=1,
                         global_batch_size=global_batch_size, train_iters=STEPS, clip_grad=clip)
    par = config.parallel
    par.tensor_model_parallel_size, par.pipeline_model_parallel_size = tp, pp
    par.virtual_pipeline_model_parallel_size, par.pipeline_schedule, par.sequence_parallel = vpp, schedule, sp
    return config


def pp_worker(world: int) -> dict:
    results = {layout: {f: run_steps(pp_config(f, *layout), STEPS) for f in FAMILIES} for layout in LAYOUTS[world]}
    if world == 4:
        # 1F1B with fewer microbatches (2) than stages (4): the warmup shrinks, nothing waits forever.
        results["few_microbatches"] = run_steps(pp_config("llama", 1, 4, 1, "1f1b", global_batch_size=2), STEPS)
    return results


@functools.cache
def spawned(world: int) -> list[dict]:
    return run_on_ranks(pp_worker, world, world)


@functools.cache
def reference(family: str, clip: float = 1.0, global_batch_size: int = 8) -> dict:
    return run_steps(pp_config(family, clip=clip, global_batch_size=global_batch_size), STEPS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("world, layout", [(w, layout) for w, layouts in LAYOUTS.items() for layout in layouts],
                         ids=lambda v: v if isinstance(v, int) else "tp{}-pp{}-vpp{}-{}{}{}".format(
                             *v[:4], "-sp" * v[4], "" if v[5] else "-no-clip"))
def test_pipeline_matches_single_device(world: int, layout: tuple, family: str) -> None:
    assert_parity(reference(family, layout[5]), merge_ranks([r[layout][family] for r in spawned(world)]), VOCAB)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("world", [2, 4])
def test_schedules_agree_with_each_other(world: int, family: str) -> None:
    ranks = spawned(world)
    pp = LAYOUTS[world][0][1]
    merged = {s: merge_ranks([r[(1, pp, v, s, False, 1.0)][family] for r in ranks])
              for (_, _, v, s, _, _) in LAYOUTS[world][:3]}
    for schedule in ("1f1b", "interleaved"):
        assert_parity(merged["gpipe"], merged[schedule], VOCAB, SCHEDULES)


def test_1f1b_with_fewer_microbatches_than_stages() -> None:
    assert_parity(reference("llama", global_batch_size=2), merge_ranks([r["few_microbatches"] for r in spawned(4)]), VOCAB)
