"""The one rank grid and its process groups; every module looks its groups up here.

Megatron's default order: tensor-parallel rank varies fastest, then data-parallel, then
pipeline stage:

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

so the ranks of a tp group are neighbours (on one node, where the bandwidth is) and a pipeline
spans the farthest ranks. A single process needs no torch.distributed at all: every group is
then None and every collective a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_lite.config import ConfigError


@dataclass
class Grid:
    """Sizes, this rank's coordinates, and its groups (None when the group has one rank)."""
    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    groups: dict[str, dist.ProcessGroup | None] = field(default_factory=dict)
    # Global ranks of every group of each kind, for the layout printed at start.
    layout: dict[str, list[list[int]]] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    def size(self, kind: str) -> int:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "mp": self.tp * self.pp,
                "embedding": min(self.pp, 2), "world": self.world_size}[kind]


_GRID = Grid()


def grid_ranks(tp: int, pp: int, dp: int) -> dict[str, list[list[int]]]:
    """Global ranks of every tp, dp, pp, model-parallel (tp x pp) and embedding group."""
    def rank(t: int, d: int, p: int) -> int:
        return t + tp * (d + dp * p)
    pp_groups = [[rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)]
    return {
        "tp": [[rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[rank(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": pp_groups,
        "mp": [[rank(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)],
        # First and last stage share the tied embedding (gpt2 family).
        "embedding": [sorted({g[0], g[-1]}) for g in pp_groups],
    }


def validate_layout(world_size: int, tp: int, pp: int) -> int:
    """dp = world / (tp * pp), or a ConfigError that names the numbers."""
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by tensor-model-parallel size {tp} x "
                          f"pipeline-model-parallel size {pp} = {tp * pp}")
    return world_size // (tp * pp)


def initialize_model_parallel(tp: int = 1, pp: int = 1, timeout_minutes: float = 5.0) -> Grid:
    """Start torch.distributed from torchrun's environment (if more than one rank) and build the groups.

    gloo on CPU, nccl on CUDA. The timeout makes a lost peer raise instead of hanging.
    """
    global _GRID
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dp = validate_layout(world_size, tp, pp)
    if world_size == 1:
        _GRID = Grid()
        return _GRID
    timeout = timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        _init_process_group(backend, world_size, timeout)
    rank = dist.get_rank()
    layout = grid_ranks(tp, pp, dp)
    groups: dict[str, dist.ProcessGroup | None] = {}
    # new_group is collective: every rank creates every group, in the same order. Without its
    # own timeout a group waits torch's default (30 minutes for gloo), not the world group's.
    for kind, members in layout.items():
        for ranks in members:
            group = dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 else None
            if rank in ranks:
                groups[kind] = group
    _GRID = Grid(tp=tp, pp=pp, dp=dp, rank=rank, groups=groups, layout=layout)
    return _GRID


def _init_process_group(backend: str, world_size: int, timeout: timedelta) -> None:
    """torch.distributed's default group, from torchrun's (or our spawn helper's) environment.

    torchrun shares its own rendezvous store with the workers, and that store outlives a failed
    attempt with every key its workers wrote. Workers restarted by --max-restarts would read the
    dead workers' addresses there and wait forever (pytorch issue 135712; the workaround was
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1). Each attempt therefore gets its own key namespace.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        dist.init_process_group(backend, timeout=timeout)
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"megatron_lite/attempt_{attempt}/", store),
                            rank=int(os.environ["RANK"]), world_size=world_size, timeout=timeout)


def destroy_model_parallel(wait_for_peers: bool = True) -> None:
    """Tear the process group down (no-op without one) and forget the grid.

    Call it before a process exits: a gloo group left for the interpreter's exit to destroy
    can abort the process ("terminate called without an active exception"), which torchrun
    counts as a failed worker. After success every rank first waits at a barrier, so none
    tears down its connections while a peer still talks to it; after an error the peers may
    be gone or stuck, so `wait_for_peers=False` skips the barrier rather than hang on it.
    """
    global _GRID
    if dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()
    _GRID = Grid()


def get_grid() -> Grid:
    return _GRID


def get_group(kind: str) -> dist.ProcessGroup | None:
    """The process group of this rank's `kind` group; None for a group of one, and for "world",
    which torch.distributed calls then take to be the default group of every rank."""
    return _GRID.groups.get(kind)


def get_tensor_model_parallel_world_size() -> int:
    return _GRID.tp


def get_tensor_model_parallel_rank() -> int:
    return _GRID.tp_rank


def get_data_parallel_world_size() -> int:
    return _GRID.dp


def get_data_parallel_rank() -> int:
    return _GRID.dp_rank


def get_pipeline_model_parallel_world_size() -> int:
    return _GRID.pp


def get_pipeline_model_parallel_rank() -> int:
    return _GRID.pp_rank


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj: object) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in a single process.
    For the few small host-side agreements (checkpoint files written, errors), not for tensors."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def print_rank_0(message: str) -> None:
    if _GRID.rank == 0:
        print(message, flush=True)
