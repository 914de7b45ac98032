"""What a pipeline schedule costs: its bubble and the microbatches it keeps in flight.

With p stages, v model chunks per rank and m microbatches per step, GPipe, 1F1B and
interleaved 1F1B (pipeline_parallel/schedules.py) all idle for (p-1)/(v*m) of a stage's busy
time (the fill and drain; interleaving cuts it v-fold because each pass is 1/v of a stage's
layers), and differ in memory: GPipe keeps all m microbatches' activations, 1F1B at most
p - r on rank r, interleaved its warmup forwards plus one, or all m*v when its warmup is every
forward (chunks of 1/v the layers; the warmup is Megatron's, schedules.interleaved_warmup).
The zero-bubble schedules (pipeline_parallel/zero_bubble.py) shrink the bubble by deferring
the weights' half of each backward and keep each activation until that half has run: up to p
microbatches on every rank (ZB-V: 2p chunk passes of half a stage each).
tests/test_pipeline_schedules.py and tests/test_zero_bubble.py check both against traces of
the real schedules.
"""
from __future__ import annotations

from collections.abc import Callable

from megatron_lite.config import Config
from megatron_lite.pipeline_parallel.schedules import interleaved_table, interleaved_warmup
from megatron_lite.pipeline_parallel.zero_bubble import zb_h1_order, zbv_order


def bubble_fraction(pp: int, vpp: int, microbatches: int, schedule: str = "1f1b") -> float:
    """Idle time over busy time of the busiest stage, with a backward twice a forward and its
    weights' half (W) as long as the input's (B): (p-1)/(v*m); ZB-H1 a third of 1F1B's,
    (p-1)/(3m); ZB-V (at least 2p-1 microbatches) a sixth, (p-1)/(6m)."""
    return (pp - 1) / ({"zb-h1": 3, "zbv": 6}.get(schedule, vpp) * microbatches)


def zero_bubble_peak(schedule: str, pp: int, rank: int, microbatches: int,
                     change: Callable[[str, int], float]) -> float:
    """The most of a quantity rank `rank` holds at once under a zero-bubble schedule, walking its
    order of passes: change(kind, chunk) is what a pass of that kind on that chunk adds (less
    than 0: frees)."""
    live = peak = 0.0
    for kind, stage, _ in (zb_h1_order if schedule == "zb-h1" else zbv_order)(pp, rank, microbatches):
        live += change(kind, int(stage >= pp))  # ZB-V's way back up is chunk 1
        peak = max(peak, live)
    return peak


def peak_in_flight(schedule: str, pp: int, rank: int, vpp: int, microbatches: int,
                   group_size: int | None = None) -> int:
    """Most chunk forwards whose backward has not run yet, on pipeline rank `rank` (group_size:
    the interleaved schedule's, default pp)."""
    if pp == 1:
        return 1  # forward and backward of each microbatch in turn
    if schedule == "gpipe":
        return microbatches
    if schedule == "1f1b":
        return min(pp - rank, microbatches)
    if schedule in ("zb-h1", "zbv"):  # an activation lives from its F to its W
        return int(zero_bubble_peak(schedule, pp, rank, microbatches, lambda kind, _: {"F": 1, "W": -1}.get(kind, 0)))
    # The steady phase runs one more forward before each backward; without one, all are alive.
    warmup = interleaved_warmup(pp, rank, vpp, microbatches, pp if group_size is None else group_size)
    return warmup if warmup == microbatches * vpp else warmup + 1


def num_microbatches(config: Config) -> int:
    """Microbatches per step on each data-parallel replica."""
    return config.train.num_microbatches(config.parallel.data_parallel_size)


def in_flight(config: Config, pp_rank: int) -> list[int]:
    """Chunk forwards in flight at the peak on `pp_rank`, per chunk (interleaving spreads them
    over its chunks, the last chunk's count listed last): their total times a chunk's
    activations is the peak."""
    par = config.parallel
    pp, vpp, m, group = par.pipeline_model_parallel_size, par.vpp, num_microbatches(config), par.microbatch_group_size
    total = peak_in_flight(par.schedule, pp, pp_rank, vpp, m, group)
    if vpp == 1:
        return [total]
    # The peak holds the first `total` forwards, counted per chunk.
    counts = [0] * vpp
    for chunk, _ in interleaved_table(m, vpp, group)[:total]:
        counts[chunk] += 1
    return counts
