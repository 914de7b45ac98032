"""Run a function on N local ranks, as torchrun would, and collect what each returns.

Tests and tools use it to run real distributed code on one CPU (gloo). A fresh interpreter per
rank costs seconds (each imports torch and megatron_lite: 10 s for 8 ranks on 2 cores), so the
ranks are forked from multiprocessing's fork server, which imported both once (its first start
costs about as much as one spawn; later ranks start in milliseconds); where there is no fork
server (Windows), they are spawned. A forked rank is given the caller's current environment and
stdout/stderr (the server's are those of its start, not of this call: a test capturing a rank's
output would see nothing); multiprocessing gives it the caller's working directory and sys.path.
Even so, a caller spawns once and its worker does many things.

Two things make it safe to call many times in a row:
- Each rank tears its process group down before it exits (a barrier first, so no peer is
  still talking to it). A gloo group left to the interpreter's exit can abort the process
  with "terminate called without an active exception" while its threads are destroyed.
- An optional stall deadline (`stall_timeout`, or $MEGATRON_LITE_SPAWN_STALL_TIMEOUT, which the
  test suite sets): every collective of megatron_lite.comm marks progress, and when no rank has
  made any for that long (a deadlock, a rank stuck in a collective or a loop) every rank prints
  its threads' stacks, all are killed and TimeoutError names the worker and the running test.
  A slow but moving run, say on a machine shared with other jobs, never trips it, which a
  deadline on the whole run would. Tools run without one.
"""
from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing import reduction
from pathlib import Path

import torch
import torch.multiprocessing as mp

from megatron_lite import comm
from megatron_lite.parallel_state import destroy_model_parallel

STALL_TIMEOUT_ENV = "MEGATRON_LITE_SPAWN_STALL_TIMEOUT"
_STACKS_SIGNAL = signal.SIGUSR1  # asks a rank to print every thread's stack
_POLL_S = 1.0
_STARTUP_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _CallersFd:
    """One of the caller's file descriptors, of which the started rank receives a copy: pickled
    while multiprocessing starts the rank, when it can hand descriptors over (`reduction.DupFd`)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        return _received_fd, (reduction.DupFd(self.fd),)


def _received_fd(dup) -> int:
    return dup.detach()


def _entry(rank: int, world_size: int, port: int, out_dir: str, progress, worker: Callable, args: tuple,
           environment: dict[str, str], stdout: int, stderr: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    os.environ.clear()
    os.environ.update(environment, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    if progress is not None:
        faulthandler.register(_STACKS_SIGNAL, all_threads=True)
        comm.set_progress_hook(lambda: progress.__setitem__(rank, time.monotonic()))
        progress[rank] = time.monotonic()  # started: importing torch, which takes seconds, is behind it
    torch.set_num_threads(1)
    try:
        result = worker(*args)
    except BaseException:
        destroy_model_parallel(wait_for_peers=False)
        raise
    destroy_model_parallel()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def resolve_stall_timeout(timeout: float | None = None) -> float | None:
    """The stall deadline a spawn runs under: the argument, else the environment's, else none."""
    if timeout is not None:
        return timeout
    value = os.environ.get(STALL_TIMEOUT_ENV)
    return float(value) if value else None


_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
# What the fork server imports before it forks any rank (its first start; see the module docstring).
multiprocessing.set_forkserver_preload(["torch", "megatron_lite.training.loop"])


def run_on_ranks(worker: Callable, world_size: int, *args, stall_timeout: float | None = None) -> list:
    """worker(*args) on every rank (torch.distributed's environment set, not yet initialised);
    the results by rank. `worker` must be importable by name (a module-level function).

    A rank that raises stops all of them and re-raises here with its traceback; ranks that make
    no progress for `stall_timeout` seconds (see the module docstring) are killed and
    TimeoutError raised. However this call ends, no rank outlives it.
    """
    stall = resolve_stall_timeout(stall_timeout)
    # Each rank's last progress (system-wide monotonic clock); 0 until it has started the worker.
    progress = (multiprocessing.get_context(_START_METHOD).Array("d", world_size, lock=False)
                if stall is not None else None)
    spawned_at = time.monotonic()
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_entry, args=(world_size, _free_port(), out_dir, progress, worker, args,
                                                   dict(os.environ), _CallersFd(1), _CallersFd(2)),
                                     nprocs=world_size, join=False, start_method=_START_METHOD)
        try:
            # join returns False while any rank still runs (without a timeout: once one has exited).
            while not context.join(timeout=None if stall is None else _POLL_S):
                if stall is None:
                    continue
                now = time.monotonic()
                # Until every rank has started (imported torch: seconds, more on a busy machine), the
                # started ones wait for the rest in init_process_group: only a generous bound applies.
                if (min(progress) and now - max(progress) >= stall) or (
                        not min(progress) and now - spawned_at >= max(stall, _STARTUP_S)):
                    for rank, process in enumerate(context.processes):
                        if process.is_alive():  # one at a time, so that their stacks do not interleave
                            print(f"--- rank {rank} of {worker.__name__}, stalled:", file=sys.stderr, flush=True)
                            os.kill(process.pid, _STACKS_SIGNAL)
                            time.sleep(0.5)
                    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
                    raise TimeoutError(f"{worker.__module__}.{worker.__name__} on {world_size} ranks made no "
                                       f"progress for {stall:g} s" + (f" (test {test})" if test else "")
                                       + "; every rank's stack was printed to stderr above")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
