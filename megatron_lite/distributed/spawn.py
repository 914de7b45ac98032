"""Run a function on N local ranks, as torchrun would, and collect what each returns.

Tests and tools use it to run real distributed code on one CPU (gloo). Spawning costs
seconds (each rank imports torch), so a caller spawns once and its worker does many things.

Two things make it safe to call many times in a row:
- Each rank tears its process group down before it exits (a barrier first, so no peer is
  still talking to it). A gloo group left to the interpreter's exit can abort the process
  with "terminate called without an active exception" while its threads are destroyed.
- An optional deadline (`timeout`, or $MEGATRON_LITE_SPAWN_TIMEOUT, which the test suite
  sets): a rank that is stuck prints every thread's stack just before it, then all ranks are
  killed and TimeoutError names the worker and the running test. Tools run without one.
"""
from __future__ import annotations

import faulthandler
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

from megatron_lite.parallel_state import destroy_model_parallel

TIMEOUT_ENV = "MEGATRON_LITE_SPAWN_TIMEOUT"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, deadline: float | None, worker: Callable,
           args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    if deadline is not None:
        # Where each rank is when the parent gives up: printed a little before it kills them.
        # `deadline` is wall-clock time (shared by all processes): a rank starts seconds late.
        faulthandler.dump_traceback_later(max(deadline - time.time() - 3.0, 1.0))
    torch.set_num_threads(1)
    try:
        result = worker(*args)
    except BaseException:
        destroy_model_parallel(wait_for_peers=False)
        raise
    destroy_model_parallel()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def spawn_timeout(timeout: float | None = None) -> float | None:
    """The deadline a spawn runs under: the argument, else $MEGATRON_LITE_SPAWN_TIMEOUT, else none."""
    if timeout is not None:
        return timeout
    value = os.environ.get(TIMEOUT_ENV)
    return float(value) if value else None


def run_on_ranks(worker: Callable, world_size: int, *args, timeout: float | None = None) -> list:
    """worker(*args) on every rank (torch.distributed's environment set, not yet initialised);
    the results by rank. `worker` must be importable by name (a module-level function).

    A rank that raises stops all of them and re-raises here with its traceback; ranks still
    running after `timeout` seconds (see the module docstring) are killed and TimeoutError
    raised. However this call ends, no rank outlives it.
    """
    timeout = spawn_timeout(timeout)
    deadline = None if timeout is None else time.time() + timeout
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_entry, args=(world_size, _free_port(), out_dir, deadline, worker, args),
                                     nprocs=world_size, join=False, start_method="spawn")
        try:
            _join(context, timeout, f"{worker.__module__}.{worker.__name__} on {world_size} ranks")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _join(context: mp.ProcessContext, timeout: float | None, what: str) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while not context.join(timeout=None if deadline is None else max(deadline - time.monotonic(), 0.0)):
        if deadline is not None and time.monotonic() >= deadline:
            test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
            raise TimeoutError(f"{what} did not finish within {timeout:g} s" + (f" (test {test})" if test else "")
                               + "; every rank's stack was printed to stderr above")
