"""Every pipeline schedule swept over p in {2, 3, 4} stages, v in {1, 2, 3} chunks per rank and the
microbatch counts each accepts, under the cost model (forward 1/v, backward 2/v per chunk; trace.py).

For each setting and rank: the order of forward and backward passes is the schedule's
closed form (written out below independently of schedules.py; interleaved: a transcription of
megatron-core's schedule table and warmup count), every (chunk, microbatch) runs exactly one
forward and one backward, each pass receives the tensor its producer made for it and starts
only after that exists, and the peak number of microbatches in flight (interleaved: Megatron's
order's) and the bubble (the textbook (p-1)/m or (p-1)/(v*m)) are what the planner predicts
(megatron_lite/planner/schedule.py). One spawn per p; the p2p is real gloo traffic.
"""
from __future__ import annotations

import functools

import pytest
import torch

from megatron_lite import parallel_state
from megatron_lite.config import ParallelConfig
from megatron_lite.config.parallel_config import interleaved_microbatches_problem
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.pipeline_parallel.schedules import interleaved_order, run_schedule
from megatron_lite.pipeline_parallel.trace import CostModelRunner, Event, Trace, bubble_fraction, peak_in_flight
from megatron_lite.planner.schedule import bubble_fraction as planned_bubble
from megatron_lite.planner.schedule import peak_in_flight as planned_peak

STAGES = (2, 3, 4)
Setting = tuple[str, int, int, int | None]  # (schedule, v, m, interleaved group size or None: pp)


def settings(p: int) -> list[Setting]:
    """For p stages: every m from 1 to 2p+1 without interleaving (fewer microbatches than stages
    included); interleaved, multiples of p up to 3p with 2 and 3 chunks, and with a group size
    above p: 2p+1 microbatches in groups of p+1 (not a multiple: a last group of p) and 2p in one."""
    plain = [(s, 1, m, None) for s in ("gpipe", "1f1b") for m in range(1, 2 * p + 2)]
    interleaved = [("interleaved", v, m, None) for v in (2, 3) for m in (p, 2 * p, 3 * p)]
    grouped = [("interleaved", v, 2 * p + 1, p + 1) for v in (2, 3)] + [("interleaved", 2, 2 * p, 2 * p)]
    return plain + interleaved + grouped


class TaggedRunner(CostModelRunner):
    """The cost model whose tensors also name the (virtual stage, microbatch) that made them, so
    that each pass checks it received its own input or output gradient, not another's."""

    tensor_shape = (3,)

    def __init__(self, trace: Trace, v: int) -> None:
        super().__init__(trace, 1.0 / v, 2.0 / v)
        grid = parallel_state.get_grid()
        self.p, self.r = grid.size("pp"), grid.coord("pp")

    def _check(self, received: torch.Tensor | None, stage: int, microbatch: int) -> torch.Tensor | None:
        if received is None:
            return None
        assert received[1:].tolist() == [stage, microbatch], f"rank {self.r} wanted {(stage, microbatch)}"
        return received[:1]

    def _tag(self, produced: torch.Tensor | None, stage: int, microbatch: int) -> torch.Tensor | None:
        return None if produced is None else torch.cat([produced, torch.tensor([stage, microbatch], dtype=self.dtype)])

    def forward(self, chunk: int, microbatch: int, input_tensor: torch.Tensor | None) -> torch.Tensor:
        stage = chunk * self.p + self.r
        y = super().forward(chunk, microbatch, self._check(input_tensor, stage - 1, microbatch))
        return self._tag(y, stage, microbatch)

    def backward(self, chunk: int, microbatch: int, input_tensor: torch.Tensor | None, output_tensor: torch.Tensor,
                 output_grad: torch.Tensor | None) -> torch.Tensor | None:
        stage = chunk * self.p + self.r
        grad = super().backward(chunk, microbatch, input_tensor, output_tensor,
                                self._check(output_grad, stage + 1, microbatch))
        return self._tag(grad, stage, microbatch)


def sweep_worker(p: int) -> dict[Setting, list[Event]]:
    parallel_state.initialize_model_parallel(ParallelConfig(pipeline_model_parallel_size=p))
    traces = {}
    for schedule, v, m, group in settings(p):
        trace = Trace(parallel_state.get_grid().rank)
        run_schedule(TaggedRunner(trace, v), schedule, m, v, microbatch_group_size=group)
        traces[(schedule, v, m, group)] = trace.events
    return traces


@functools.cache
def spawned(p: int) -> list[dict]:
    return run_on_ranks(sweep_worker, p, p)


def megatron_interleaved_order(p: int, r: int, v: int, m: int, group: int) -> list[tuple[str, int, int]]:
    """megatron-core's interleaved order, transcribed: get_schedule_table's (microbatch, chunk)
    list, get_pp_rank_microbatches' warmup count, convert_schedule_table_to_order's merge of the
    forward (chunk + 1) and backward (chunk - v) sequences; each chunk then runs its forwards and
    its backwards in microbatch order (Megatron pops each chunk's tensors first in, first out)."""
    table = []
    for first in range(0, m, group):
        end = m if first + group >= m else first + group
        table += [(i, c) for c in range(v) for i in range(first, end)]
    total = m * v
    warmup = min((p - r - 1) * 2 + (v - 1) * group, total)
    forward_order = [c + 1 for _, c in table]
    backward_order = [c - v for _, c in table]
    order = forward_order[:warmup]
    for i in range(warmup, total):
        order += [forward_order[i], backward_order[i - warmup]]
    order += backward_order[total - warmup:]
    ran: dict[int, int] = {}
    passes = []
    for signed in order:
        kind, chunk = ("F", signed - 1) if signed > 0 else ("B", -signed - 1)
        ran[signed] = ran.get(signed, 0) + 1
        passes.append((kind, chunk, ran[signed] - 1))
    return passes


def expected_order(schedule: str, p: int, r: int, v: int, m: int, group: int | None) -> list[tuple[str, int, int]]:
    """(kind, chunk, microbatch) in the order rank r runs them."""
    if schedule == "gpipe":
        return [("F", 0, i) for i in range(m)] + [("B", 0, i) for i in range(m)]
    if schedule == "1f1b":
        warmup = min(p - r - 1, m)
        order = [("F", 0, i) for i in range(warmup)]
        for i in range(m - warmup):
            order += [("F", 0, warmup + i), ("B", 0, i)]
        return order + [("B", 0, i) for i in range(m - warmup, m)]
    return megatron_interleaved_order(p, r, v, m, group or p)


def order_peak(order: list[tuple[str, int, int]]) -> int:
    """Most passes whose forward ran and whose backward has not, along an order."""
    live = peak = 0
    for kind, _, _ in order:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


CASES = [(p, *s) for p in STAGES for s in settings(p)]


@pytest.mark.parametrize("p, schedule, v, m, group", CASES,
                         ids=[f"p{p}-{s}-v{v}-m{m}" + (f"-g{g}" if g else "") for p, s, v, m, g in CASES])
def test_schedule_order_dependencies_memory_and_bubble(p: int, schedule: str, v: int, m: int,
                                                       group: int | None) -> None:
    events = [e for rank in spawned(p) for e in rank[(schedule, v, m, group)]]
    by_pass = {}
    for r in range(p):
        mine = [e for e in events if e.rank == r]
        expected = expected_order(schedule, p, r, v, m, group)
        assert [(e.kind, e.chunk, e.microbatch) for e in mine] == expected, f"rank {r}"
        if schedule == "interleaved":
            assert interleaved_order(p, r, v, m, group) == expected, f"rank {r}"
        for e in mine:
            by_pass[(e.kind, e.chunk * p + r, e.microbatch)] = e  # keyed by virtual stage
        assert peak_in_flight(events, r) == order_peak(expected) == planned_peak(schedule, p, r, v, m, group), \
            f"rank {r}"
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


@pytest.mark.parametrize("p, v", [(4, 2), (2, 3), (3, 2)])
def test_as_many_microbatches_as_stages_keeps_megatrons_peak(p: int, v: int) -> None:
    """m == p (issue #21): rank r keeps its 2*(p-r-1) + (v-1)*p warmup forwards plus one alive, or
    all p*v where that is more, so the last rank holds (v-1)*p + 1 instead of p*v."""
    peaks = [order_peak(interleaved_order(p, r, v, p)) for r in range(p)]
    assert peaks == [min(2 * (p - r - 1) + (v - 1) * p + 1, p * v) for r in range(p)]
    assert peaks[-1] == (v - 1) * p + 1 < p * v


def test_interleaved_accepts_exactly_the_microbatch_counts_megatron_does() -> None:
    """forward_backward_pipelining_with_interleaving's two checks, transcribed: the group size
    within [pp, m], and the last group (m mod group size) empty or of at least pp."""
    for p in (2, 3, 4):
        for m in range(1, 14):
            for group in range(1, 15):
                megatron_accepts = p <= group <= m and not 0 < m % group < p
                assert (interleaved_microbatches_problem(p, m, group) is None) == megatron_accepts, (p, m, group)
