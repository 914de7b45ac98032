"""The one rank grid and its process groups; every module looks its sizes, coordinates and groups up here.

Ranks are laid out on named axes in Megatron's default order, fastest first:

    AXES = (tp, cp, dp, pp)    rank = tp_r + tp * (cp_r + cp * (dp_r + dp * pp_r))

so the ranks of a tp group are neighbours (on one node, where the bandwidth is) and a pipeline
spans the farthest ranks. A group is any set of axes: its members are the ranks that differ
only in those axes' coordinates ("tp": one tensor-parallel group; "mp" = tp x pp, the model
parallel group; "dp-cp", over which gradients are averaged once context parallelism splits the
sequence). Two groups are not axes: "embedding", the ranks of the first and last stage of a
pipeline (they share the tied embedding; one rank under ZB-V's V placement), and "world". Every
axis may have size 1; a group of one rank has no process group (None) and every collective on it
is a no-op. A single process needs no
torch.distributed at all.

Adding a parallelism adds an axis name to AXES, where its size comes from in AXIS_SIZES, and
any group of it to GROUPS; nothing else here changes.

Mixture-of-experts layers view the same ranks through Megatron's expert grid, expert-tp x ep x
edp x pp with expert-tp 1 (experts are never split over tp): the tp x cp x dp coordinates of a
rank, flattened (tp fastest), are split again into an expert-parallel coordinate (fastest) and
an expert-data-parallel one. "ep" groups hold the different experts of a layer and exchange
tokens; "edp" groups hold the same experts and sum their gradients. Taking ep from the fastest
ranks first puts the all-to-all on neighbours, as Megatron does: at tp 2 x ep 2 the two tp ranks
of a pair hold different experts, each routing its own sequence-parallel tokens.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import product

import torch
import torch.distributed as dist

from megatron_lite.config import ConfigError, ParallelConfig

AXES = ("tp", "cp", "dp", "pp")
# Where each axis's size comes from: a ParallelConfig field, or None for dp, which takes what the
# world leaves.
AXIS_SIZES = {"tp": "tensor_model_parallel_size", "cp": "context_parallel_size", "dp": None,
              "pp": "pipeline_model_parallel_size"}
# Named groups over several axes (a single axis is a group under its own name).
GROUPS = {"mp": ("tp", "pp"), "tp-cp": ("tp", "cp"), "dp-cp": ("cp", "dp")}
EXPERT_GROUPS = ("ep", "edp")  # the expert view (see the module docstring)


@dataclass
class Grid:
    """Axis sizes (fastest first), this rank, and its process groups (None for a group of one rank)."""
    sizes: dict[str, int] = field(default_factory=lambda: {axis: 1 for axis in AXES})
    rank: int = 0
    expert_parallel: int = 1  # the ep size of the expert view (it divides tp x cp x dp)
    v_shape: bool = False  # ZB-V's placement: the last pipeline stage is on the first rank
    groups: dict[str, dist.ProcessGroup | None] = field(default_factory=dict)
    # This rank's members of each group name, computed once: collectives ask for sizes on every call.
    _members: dict[str, list[int]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def world_size(self) -> int:
        return math.prod(self.sizes.values())

    def axes_of(self, name: str) -> tuple[str, ...]:
        """The axes a group name spans ("tp", "mp" = ("tp", "pp"), "world" = all)."""
        if name in self.sizes:
            return (name,)
        if name == "world":
            return tuple(self.sizes)
        if name in GROUPS:
            return GROUPS[name]
        raise KeyError(f"no group named {name!r}; axes: {', '.join(self.sizes)}; groups: {', '.join(GROUPS)}, "
                       f"{', '.join(EXPERT_GROUPS)}, embedding, world")

    def coord(self, axis: str, rank: int | None = None) -> int:
        """This rank's (or `rank`'s) coordinate on one axis."""
        stride = 1
        for name, size in self.sizes.items():
            if name == axis:
                return (self.rank if rank is None else rank) // stride % size
            stride *= size
        raise KeyError(f"no axis named {axis!r}; axes: {', '.join(self.sizes)}")

    def rank_of(self, coords: dict[str, int]) -> int:
        """The global rank at these coordinates (missing axes: 0)."""
        rank, stride = 0, 1
        for name, size in self.sizes.items():
            rank += coords.get(name, 0) * stride
            stride *= size
        return rank

    def ranks(self, name: str) -> list[list[int]]:
        """Every group of this name, as lists of global ranks (each in the order of its own coordinates)."""
        if name == "embedding":
            return [sorted({g[0], g[0] if self.v_shape else g[-1]}) for g in self.ranks("pp")]
        if name in EXPERT_GROUPS:
            return self._expert_ranks(name)
        inner = self.axes_of(name)
        outer = [a for a in self.sizes if a not in inner]
        groups = []
        for fixed in product(*(range(self.sizes[a]) for a in reversed(outer))):
            base = dict(zip(reversed(outer), fixed))
            members = product(*(range(self.sizes[a]) for a in reversed(inner)))
            groups.append([self.rank_of({**base, **dict(zip(reversed(inner), m))}) for m in members])
        return groups

    def _expert_ranks(self, name: str) -> list[list[int]]:
        """ep or edp groups: over the flattened tp x cp x dp index f of each pp coordinate (the
        rank is f + flat * pp_r), ep groups are runs of `expert_parallel` consecutive f, edp
        groups every ep-th f."""
        flat, ep = self.sizes["tp"] * self.sizes["cp"] * self.sizes["dp"], self.expert_parallel
        groups = []
        for pp_r in range(self.sizes["pp"]):
            base = flat * pp_r
            if name == "ep":
                groups += [[base + e * ep + j for j in range(ep)] for e in range(flat // ep)]
            else:
                groups += [[base + i * ep + j for i in range(flat // ep)] for j in range(ep)]
        return groups

    def members(self, name: str) -> list[int]:
        """The global ranks of this rank's group of this name."""
        if name not in self._members:
            self._members[name] = next(g for g in self.ranks(name) if self.rank in g)
        return self._members[name]

    def size(self, name: str) -> int:
        return len(self.members(name))

    def index(self, name: str) -> int:
        """This rank's position in its group of this name (its coordinate, for a single axis)."""
        return self.members(name).index(self.rank)


def group_names(grid: Grid) -> list[str]:
    """Every group name the grid builds, in the order every rank creates them."""
    return [*grid.sizes, *GROUPS, *EXPERT_GROUPS, "embedding"]


_GRID = Grid()


def axis_sizes(parallel: ParallelConfig, world_size: int) -> dict[str, int]:
    """Every axis's size for this world, dp being what the others leave; a ConfigError names the numbers."""
    sizes = {axis: getattr(parallel, AXIS_SIZES[axis]) if AXIS_SIZES.get(axis) else 1 for axis in AXES}
    model = math.prod(size for axis, size in sizes.items() if axis != "dp")
    if world_size % model:
        named = " x ".join(f"{field.removesuffix('_size').replace('_', '-')} size {sizes[axis]}"
                           for axis, field in AXIS_SIZES.items() if field)
        raise ConfigError(f"world size {world_size} is not divisible by {named} = {model}")
    sizes["dp"] = world_size // model
    return sizes


def plan_grid(parallel: ParallelConfig, world_size: int, rank: int = 0) -> Grid:
    """The grid of `world_size` ranks as `rank` sees it, without process groups: what
    initialize_model_parallel builds, and what a dry run checks and describes without starting any."""
    sizes = axis_sizes(parallel, world_size)
    ep = parallel.expert_model_parallel_size
    if (sizes["tp"] * sizes["cp"] * sizes["dp"]) % ep:
        raise ConfigError(f"--expert-model-parallel-size={ep} does not divide tp x dp x cp = "
                          f"{sizes['tp']} x {sizes['dp']} x {sizes['cp']} (the ranks of one pipeline stage)")
    return Grid(sizes, rank, ep, parallel.v_shape)


def initialize_model_parallel(parallel: ParallelConfig) -> Grid:
    """Start torch.distributed from torchrun's environment (if more than one rank) and build every group.

    gloo on CPU, nccl on CUDA. Every group waits at most parallel.distributed_timeout_minutes
    for a peer, so a lost peer raises instead of hanging.
    """
    global _GRID
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    planned = plan_grid(parallel, world_size)
    if world_size == 1:
        _GRID = planned
        return _GRID
    timeout = timedelta(minutes=parallel.distributed_timeout_minutes)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        _init_process_group(backend, world_size, timeout)
    grid = Grid(planned.sizes, dist.get_rank(), planned.expert_parallel, parallel.v_shape)
    made: dict[tuple[int, ...], dist.ProcessGroup] = {}
    # new_group is collective: every rank creates every group, in the same order. Names with the
    # same members (any group over axes of size 1) share one process group. Without its own
    # timeout a group would wait torch's default (30 minutes for gloo), not the world group's.
    for name in group_names(grid):
        for ranks in grid.ranks(name):
            if len(ranks) > 1 and tuple(ranks) not in made:
                made[tuple(ranks)] = dist.new_group(ranks, timeout=timeout)
            if grid.rank in ranks:
                grid.groups[name] = made.get(tuple(ranks))
    _GRID = grid
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


def get_group(name: str) -> dist.ProcessGroup | None:
    """This rank's process group of that name; None for a group of one rank, and for "world",
    which torch.distributed calls then take to be the default group of every rank."""
    return _GRID.groups.get(name)


def print_rank_0(message: str) -> None:
    if _GRID.rank == 0:
        print(message, flush=True)
