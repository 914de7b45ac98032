"""The rank grid: every group of any axes (an extra cp axis included) against a brute-force
enumeration of the rank formula, and a collective that a peer never joins raising after
--distributed-timeout-minutes on every group, not only the world group."""
from __future__ import annotations

import math
import time

import pytest
import torch

from megatron_lite import comm, parallel_state
from megatron_lite.comm import all_reduce
from megatron_lite.config import ConfigError, ParallelConfig
from megatron_lite.distributed.spawn import STALL_TIMEOUT_ENV, run_on_ranks
from megatron_lite.parallel_state import Grid, axis_sizes

TIMEOUT_S = 4.0


def stuck_peer_worker() -> tuple[str, float]:
    """Rank 0 all-reduces over tp; rank 1 never joins. Returns rank 0's error and how long it waited."""
    parallel_state.initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=2,
                                                            distributed_timeout_minutes=TIMEOUT_S / 60))
    if parallel_state.get_grid().rank == 1:
        # Stay alive past rank 0's timeout (it must time out, not see a closed connection), and
        # reach the barrier at exit well within the world group's timeout after rank 0 does.
        time.sleep(TIMEOUT_S + 1.5)
        return "", 0.0
    start = time.monotonic()
    try:
        all_reduce(torch.ones(4), group="tp")
    except RuntimeError as exc:
        return str(exc), time.monotonic() - start
    return "no error", time.monotonic() - start


def test_collective_on_a_subgroup_times_out() -> None:
    error, waited = run_on_ranks(stuck_peer_worker, 2)[0]
    assert "timed out" in error.lower() or "timeout" in error.lower(), error
    assert TIMEOUT_S * 0.9 <= waited < TIMEOUT_S + 5.0


def _brute_force(sizes: dict[str, int]) -> dict[int, dict[str, int]]:
    """Each rank's coordinates from the rank formula written out: rank = tp + TP*(cp + CP*(dp + DP*pp))."""
    coords = {}
    for p in range(sizes["pp"]):
        for d in range(sizes["dp"]):
            for c in range(sizes["cp"]):
                for t in range(sizes["tp"]):
                    rank = t + sizes["tp"] * (c + sizes["cp"] * (d + sizes["dp"] * p))
                    coords[rank] = {"tp": t, "cp": c, "dp": d, "pp": p}
    return coords


@pytest.mark.parametrize("sizes", [dict(tp=2, cp=2, dp=2, pp=1), dict(tp=2, cp=2, dp=1, pp=2),
                                   dict(tp=2, cp=1, dp=2, pp=2), dict(tp=1, cp=2, dp=3, pp=2),
                                   dict(tp=4, cp=1, dp=1, pp=1)],
                         ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_every_group_matches_the_rank_formula(sizes: dict[str, int]) -> None:
    coords = _brute_force(sizes)
    world = len(coords)
    for name in ("tp", "cp", "dp", "pp", "mp", "tp-cp", "dp-cp", "world"):
        spanned = {"mp": {"tp", "pp"}, "tp-cp": {"tp", "cp"}, "dp-cp": {"dp", "cp"},
                   "world": set(sizes)}.get(name, {name})
        fixed = [a for a in sizes if a not in spanned]
        expected = {frozenset(r for r in coords if all(coords[r][a] == coords[q][a] for a in fixed)) for q in coords}
        for rank in range(world):
            grid = Grid(dict(sizes), rank)
            assert {frozenset(g) for g in grid.ranks(name)} == expected, name
            mine = grid.members(name)
            assert set(mine) in [set(g) for g in expected] and rank in mine
            assert grid.size(name) == len(mine) == math.prod(sizes[a] for a in spanned)
            # Members are ordered by their own coordinates, fastest axis first, as in the rank formula.
            key = [a for a in sizes if a in spanned]
            assert mine == sorted(mine, key=lambda r: [coords[r][a] for a in reversed(key)])
            if name in sizes:
                assert grid.coord(name) == coords[rank][name] == grid.index(name)
    for rank in range(world):
        grid = Grid(dict(sizes), rank)
        pipeline = grid.members("pp")
        assert grid.members("embedding") == sorted({pipeline[0], pipeline[-1]})
        assert grid.rank_of(coords[rank]) == rank


@pytest.mark.parametrize("sizes, ep", [(dict(tp=2, cp=1, dp=2, pp=2), 2), (dict(tp=2, cp=2, dp=2, pp=1), 4),
                                       (dict(tp=1, cp=2, dp=2, pp=2), 2), (dict(tp=2, cp=1, dp=2, pp=1), 1)],
                         ids=lambda v: "-".join(f"{k}{x}" for k, x in v.items()) if isinstance(v, dict) else f"ep{v}")
def test_expert_groups_split_each_stage_with_tp_fastest(sizes: dict[str, int], ep: int) -> None:
    """Megatron's expert grid with expert-tp 1: the flattened index f = tp + TP*(cp + CP*dp) of a
    rank within its stage; ep groups share the stage and f // ep, edp groups the stage and f % ep."""
    coords = _brute_force(sizes)

    def flat(r: int) -> int:
        c = coords[r]
        return c["tp"] + sizes["tp"] * (c["cp"] + sizes["cp"] * c["dp"])
    for rank in coords:
        grid = Grid(dict(sizes), rank, ep)
        same_stage = [r for r in sorted(coords) if coords[r]["pp"] == coords[rank]["pp"]]
        assert grid.members("ep") == [r for r in same_stage if flat(r) // ep == flat(rank) // ep]
        assert grid.members("edp") == [r for r in same_stage if flat(r) % ep == flat(rank) % ep]
        assert grid.size("ep") * grid.size("edp") == len(same_stage)
        assert grid.index("ep") == flat(rank) % ep


def test_axis_sizes_take_dp_from_the_world_and_name_what_does_not_divide() -> None:
    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert axis_sizes(parallel, 8) == {"tp": 2, "cp": 1, "dp": 2, "pp": 2}
    with pytest.raises(ConfigError, match="world size 6 is not divisible by tensor-model-parallel size 2 x "
                                          "context-parallel size 1 x pipeline-model-parallel size 2 = 4"):
        axis_sizes(parallel, 6)


def slow_worker(seconds: float) -> int:
    """Moves (a barrier every 0.5 s) for `seconds`, then returns."""
    parallel_state.initialize_model_parallel(ParallelConfig())
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        time.sleep(0.5)
        comm.barrier()
    return 1


def stuck_worker() -> int:
    parallel_state.initialize_model_parallel(ParallelConfig())
    if parallel_state.get_grid().rank == 1:
        time.sleep(600)  # never joins the barrier rank 0 waits in
    comm.barrier()
    return 1


def test_spawn_watchdog_stops_stalled_ranks_not_slow_ones(capfd) -> None:
    """A run that keeps completing collectives may take longer than the stall deadline; one where
    no rank completes any for that long is stopped, naming the worker, with every rank's stack."""
    assert run_on_ranks(slow_worker, 2, 8.0, stall_timeout=4.0) == [1, 1]
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"test_parallel_state.stuck_worker on 2 ranks made no progress for 4 s "
                                           r"\(test tests/test_parallel_state.py::test_spawn_watchdog"):
        run_on_ranks(stuck_worker, 2, stall_timeout=4.0)
    assert time.monotonic() - start < 30
    assert "in stuck_worker" in capfd.readouterr().err


def uneven_worker() -> int:
    parallel_state.initialize_model_parallel(ParallelConfig())
    rank = parallel_state.get_grid().rank
    time.sleep(2.0 * rank)  # rank 0 exits first, rank 1 still runs
    return rank


def test_spawn_without_a_stall_deadline_waits_for_every_rank(monkeypatch) -> None:
    """Tools run without a deadline: ranks that end at different times are all waited for."""
    monkeypatch.delenv(STALL_TIMEOUT_ENV, raising=False)
    assert run_on_ranks(uneven_worker, 2) == [0, 1]
