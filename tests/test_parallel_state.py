"""The rank grid's process groups: a collective that a peer never joins raises after
--distributed-timeout-minutes on every group, not only the world group."""
from __future__ import annotations

import time

import torch

from megatron_lite import parallel_state
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.tensor_parallel.mappings import all_reduce

TIMEOUT_S = 4.0


def stuck_peer_worker() -> tuple[str, float]:
    """Rank 0 all-reduces over tp; rank 1 never joins. Returns rank 0's error and how long it waited."""
    parallel_state.initialize_model_parallel(2, 1, timeout_minutes=TIMEOUT_S / 60)
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
