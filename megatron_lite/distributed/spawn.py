"""Run a function on N local ranks, as torchrun would, and collect what each returns.

Tests and tools use it to run real distributed code on one CPU (gloo). Spawning costs
seconds (each rank imports torch), so a caller spawns once and its worker does many things.
"""
from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, worker: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = worker(*args)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def run_on_ranks(worker: Callable, world_size: int, *args) -> list:
    """worker(*args) on every rank (torch.distributed's environment set, not yet initialised);
    the results by rank. `worker` must be importable by name (a module-level function)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world_size, _free_port(), out_dir, worker, args), nprocs=world_size,
                           join=True, start_method="spawn")
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
