"""What a pipeline schedule costs: its bubble and the microbatches it keeps in flight.

With p stages, v model chunks per rank and m microbatches per step, GPipe, 1F1B and
interleaved 1F1B (pipeline_parallel/schedules.py) all idle for (p-1)/(v*m) of a stage's busy
time (the fill and drain; interleaving cuts it v-fold because each pass is 1/v of a stage's
layers), and differ in memory: GPipe keeps all m microbatches' activations, 1F1B at most
p - r on rank r, interleaved its warmup forwards plus one (chunks of 1/v the layers).
tests/test_pipeline_schedules.py checks both against traces of the real schedules.
"""
from __future__ import annotations

from megatron_lite.config import Config


def bubble_fraction(pp: int, vpp: int, microbatches: int) -> float:
    """Idle time over busy time of the busiest stage: (p-1)/(v*m); 0 without pipelining."""
    return (pp - 1) / (vpp * microbatches)


def interleaved_warmup(pp: int, rank: int, vpp: int, microbatches: int) -> int:
    """Forwards rank `rank` runs before its first backward (Megatron's rule; all of them when m == p)."""
    total = microbatches * vpp
    return total if microbatches == pp else min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)


def peak_in_flight(schedule: str, pp: int, rank: int, vpp: int, microbatches: int) -> int:
    """Most chunk forwards whose backward has not run yet, on pipeline rank `rank`."""
    if pp == 1:
        return 1  # forward and backward of each microbatch in turn
    if schedule == "gpipe":
        return microbatches
    if schedule == "1f1b":
        return min(pp - rank, microbatches)
    warmup = interleaved_warmup(pp, rank, vpp, microbatches)
    return warmup if warmup == microbatches * vpp else warmup + 1


def num_microbatches(config: Config) -> int:
    """Microbatches per step on each data-parallel replica."""
    return config.train.num_microbatches(config.parallel.data_parallel_size)


def in_flight(config: Config, pp_rank: int) -> list[int]:
    """Chunk forwards in flight at the peak on `pp_rank`, per chunk (interleaving spreads them
    over its chunks, the last chunk's count listed last): their total times a chunk's
    activations is the peak."""
    par = config.parallel
    pp, vpp, m = par.pipeline_model_parallel_size, par.vpp, num_microbatches(config)
    total = peak_in_flight(par.schedule, pp, pp_rank, vpp, m)
    if vpp == 1:
        return [total]
    # Forward k runs chunk (k % (p*v)) // p: the first total forwards, counted per chunk.
    counts = [0] * vpp
    for k in range(total):
        counts[(k % (pp * vpp)) // pp] += 1
    return counts
