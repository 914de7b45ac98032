"""Pipeline parallelism on gloo ranks: every schedule against one device, against each other, and
the cost-model trace against the textbook bubble and memory figures.

Three spawns (2, 4 and 8 ranks); tolerances as in test_tensor_parallel.py.
"""
from __future__ import annotations

import functools

import pytest

from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite import parallel_state
from megatron_lite.pipeline_parallel.schedules import run_schedule
from megatron_lite.pipeline_parallel.trace import CostModelRunner, Trace, bubble_fraction, peak_in_flight
from parity import max_differences, merge_ranks, run_steps
from tiny import tiny_config

FAMILIES = ("llama", "gpt2")
VOCAB = 258
STEPS = 5
# (tp, pp, vpp, schedule, sequence parallel) per world size.
LAYOUTS = {
    2: [(1, 2, 1, "gpipe", False), (1, 2, 1, "1f1b", False), (1, 2, 2, "interleaved", False)],
    4: [(1, 4, 1, "gpipe", False), (1, 4, 1, "1f1b", False), (1, 4, 2, "interleaved", False),
        (2, 2, 1, "1f1b", True), (2, 2, 2, "interleaved", True)],
    8: [(2, 4, 1, "1f1b", True), (2, 4, 2, "interleaved", True)],
}


def pp_config(family: str, tp: int = 1, pp: int = 1, vpp: int = 1, schedule: str | None = None, sp: bool = False,
              global_batch_size: int = 8):
    config = tiny_config(family, model=dict(num_layers=8, vocab_size=VOCAB), micro_batch_size=1,
                         global_batch_size=global_batch_size, train_iters=STEPS, clip_grad=1.0)
    par = config.parallel
    par.tensor_model_parallel_size, par.pipeline_model_parallel_size = tp, pp
    par.virtual_pipeline_model_parallel_size, par.pipeline_schedule, par.sequence_parallel = vpp, schedule, sp
    par.distributed_timeout_minutes = 2.0
    return config


def cost_model_traces(pp: int, num_microbatches: int) -> dict:
    """Events of each schedule under the cost model: forward 1, backward 2 per whole stage."""
    parallel_state.initialize_model_parallel(1, pp, timeout_minutes=2.0)
    traces = {}
    for schedule, vpp in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        trace = Trace(parallel_state.get_grid().rank)
        run_schedule(CostModelRunner(trace, 1.0 / vpp, 2.0 / vpp), schedule, num_microbatches, vpp)
        traces[schedule] = trace.events
    return traces


def pp_worker(world: int) -> dict:
    results = {layout: {f: run_steps(pp_config(f, *layout), STEPS) for f in FAMILIES} for layout in LAYOUTS[world]}
    if world == 4:
        results["traces"] = cost_model_traces(4, 8)
        # 1F1B with fewer microbatches (2) than stages (4): the warmup shrinks, nothing waits forever.
        results["few_microbatches"] = run_steps(pp_config("llama", 1, 4, 1, "1f1b", global_batch_size=2), STEPS)
    return results


@functools.cache
def spawned(world: int) -> list[dict]:
    return run_on_ranks(pp_worker, world, world)


@functools.cache
def reference(family: str, global_batch_size: int = 8) -> dict:
    return run_steps(pp_config(family, global_batch_size=global_batch_size), STEPS)


def _assert_parity(ref: dict, ranks: list[dict]) -> None:
    diff = max_differences(ref, merge_ranks(ranks), VOCAB)
    assert diff["loss"] < 1e-5 and diff["grad"] < 1e-6 and diff["weight"] < 5e-5, diff


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("world, layout", [(w, layout) for w, layouts in LAYOUTS.items() for layout in layouts],
                         ids=lambda v: v if isinstance(v, int) else "tp{}-pp{}-vpp{}-{}{}".format(*v[:4], "-sp" * v[4]))
def test_pipeline_matches_single_device(world: int, layout: tuple, family: str) -> None:
    _assert_parity(reference(family), [r[layout][family] for r in spawned(world)])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("world", [2, 4])
def test_schedules_agree_with_each_other(world: int, family: str) -> None:
    ranks = spawned(world)
    pp = LAYOUTS[world][0][1]
    merged = {s: merge_ranks([r[(1, pp, v, s, False)][family] for r in ranks])
              for (_, _, v, s, _) in LAYOUTS[world][:3]}
    for schedule in ("1f1b", "interleaved"):
        diff = max_differences(merged["gpipe"], merged[schedule], VOCAB)
        assert diff["loss"] < 1e-6 and diff["grad"] < 1e-7 and diff["weight"] < 1e-6, (schedule, diff)


def test_1f1b_with_fewer_microbatches_than_stages() -> None:
    _assert_parity(reference("llama", 2), [r["few_microbatches"] for r in spawned(4)])


def _events(schedule: str) -> list:
    return [e for r in spawned(4) for e in r["traces"][schedule]]


@pytest.mark.parametrize("schedule, vpp", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)])
def test_bubble_matches_the_formula(schedule: str, vpp: int) -> None:
    p, m = 4, 8
    assert abs(bubble_fraction(_events(schedule)) - (p - 1) / (vpp * m)) < 0.02


def test_1f1b_keeps_at_most_p_minus_rank_microbatches_in_flight() -> None:
    p, m = 4, 8
    assert [peak_in_flight(_events("1f1b"), r) for r in range(p)] == [p - r for r in range(p)]
    assert [peak_in_flight(_events("gpipe"), r) for r in range(p)] == [m] * p
