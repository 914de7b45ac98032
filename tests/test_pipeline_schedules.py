"""Every pipeline schedule swept over p in {2, 3, 4} stages, v in {1, 2, 3} chunks per rank and the
microbatch counts each accepts, under the cost model (forward 1/v, backward 2/v per chunk; trace.py).

For each setting and rank: the order of forward and backward passes is the schedule's
closed form (written out below independently of schedules.py), every (chunk, microbatch) runs
exactly one forward and one backward, each pass starts only after its inputs exist on the
neighbouring stage, and the peak number of microbatches in flight and the bubble (the textbook
(p-1)/m or (p-1)/(v*m)) are what the planner predicts (megatron_lite/planner/schedule.py).
One spawn per p; the p2p is real gloo traffic.
"""
from __future__ import annotations

import functools

import pytest

from megatron_lite import parallel_state
from megatron_lite.config import ParallelConfig
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.pipeline_parallel.schedules import run_schedule
from megatron_lite.planner.schedule import bubble_fraction as planned_bubble, interleaved_warmup
from megatron_lite.planner.schedule import peak_in_flight as planned_peak
from megatron_lite.pipeline_parallel.trace import CostModelRunner, Event, Trace, bubble_fraction, peak_in_flight

STAGES = (2, 3, 4)


def settings(p: int) -> list[tuple[str, int, int]]:
    """(schedule, v, m) for p stages: every m from 1 to 2p+1 without interleaving (fewer
    microbatches than stages included), multiples of p up to 3p with 2 and 3 chunks."""
    plain = [(s, 1, m) for s in ("gpipe", "1f1b") for m in range(1, 2 * p + 2)]
    return plain + [("interleaved", v, m) for v in (2, 3) for m in (p, 2 * p, 3 * p)]


def sweep_worker(p: int) -> dict[tuple[str, int, int], list[Event]]:
    parallel_state.initialize_model_parallel(ParallelConfig(pipeline_model_parallel_size=p))
    traces = {}
    for schedule, v, m in settings(p):
        trace = Trace(parallel_state.get_grid().rank)
        run_schedule(CostModelRunner(trace, 1.0 / v, 2.0 / v), schedule, m, v)
        traces[(schedule, v, m)] = trace.events
    return traces


@functools.cache
def spawned(p: int) -> list[dict]:
    return run_on_ranks(sweep_worker, p, p)


def expected_order(schedule: str, p: int, r: int, v: int, m: int) -> list[tuple[str, int, int]]:
    """(kind, chunk, microbatch) in the order rank r runs them."""
    if schedule == "gpipe":
        return [("F", 0, i) for i in range(m)] + [("B", 0, i) for i in range(m)]
    if schedule == "1f1b":
        warmup = min(p - r - 1, m)
        order = [("F", 0, i) for i in range(warmup)]
        for i in range(m - warmup):
            order += [("F", 0, warmup + i), ("B", 0, i)]
        return order + [("B", 0, i) for i in range(m - warmup, m)]
    # Interleaved: virtual step k is microbatch (k // pv) * p + k % p on chunk (k % pv) // p going
    # forward, on the mirrored chunk going backward; warmup forwards, then 1F1B pairs, then backwards.
    def step(kind: str, k: int) -> tuple[str, int, int]:
        chunk = (k % (p * v)) // p
        return kind, chunk if kind == "F" else v - 1 - chunk, (k // (p * v)) * p + k % p
    total, warmup = m * v, interleaved_warmup(p, r, v, m)
    order = [step("F", k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [step("F", warmup + k), step("B", k)]
    return order + [step("B", k) for k in range(total - warmup, total)]


CASES = [(p, *s) for p in STAGES for s in settings(p)]


@pytest.mark.parametrize("p, schedule, v, m", CASES, ids=[f"p{p}-{s}-v{v}-m{m}" for p, s, v, m in CASES])
def test_schedule_order_dependencies_memory_and_bubble(p: int, schedule: str, v: int, m: int) -> None:
    events = [e for rank in spawned(p) for e in rank[(schedule, v, m)]]
    by_pass = {}
    for r in range(p):
        mine = [e for e in events if e.rank == r]
        assert [(e.kind, e.chunk, e.microbatch) for e in mine] == expected_order(schedule, p, r, v, m), f"rank {r}"
        for e in mine:
            by_pass[(e.kind, e.chunk * p + r, e.microbatch)] = e  # keyed by virtual stage
        assert peak_in_flight(events, r) == planned_peak(schedule, p, r, v, m), f"rank {r}"
    # Each pass exactly once (the order check above allows no repeats), and each starts after its inputs.
    stages = p * v
    assert len(by_pass) == 2 * stages * m
    for (kind, stage, i), e in by_pass.items():
        if kind == "F" and stage > 0:
            assert e.start >= by_pass[("F", stage - 1, i)].end
        if kind == "B":
            assert e.start >= by_pass[("F", stage, i)].end
            if stage < stages - 1:
                assert e.start >= by_pass[("B", stage + 1, i)].end
    assert bubble_fraction(events) == pytest.approx(planned_bubble(p, v, m), abs=1e-12)
