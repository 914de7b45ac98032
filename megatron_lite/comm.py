"""Every collective of the library, on groups named by the rank grid, and the meter that counts them.

Each call takes a group name ("tp", "dp", "pp", "mp", "embedding", "world", ...; see
parallel_state) and is a no-op on a group of one rank, so the same code runs on one process.
The meter counts every call per (op, group) twice over: `bytes`, the logical volume (the
tensor of an all-reduce, the gathered output of an all-gather, the unreduced input of a
reduce-scatter, the local tensor of an all-to-all, what a rank sends point-to-point), and
`wire_bytes`, what each rank sends with the ring algorithm on n ranks: 2(n-1)/n of the volume
for an all-reduce, (n-1)/n for an all-gather, a reduce-scatter or an all-to-all (which keeps
1/n of its tensor). Tests compare both with the analytic volume of a layout.

gloo (CPU) has no reduce-scatter; there it is an all-reduce of which each rank keeps its chunk:
the same result, and the meter records the volume a real reduce-scatter moves.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_lite import parallel_state

_RING_FACTOR = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0, "all_to_all": 1.0}


def ring_wire_bytes(op: str, n: int, nbytes: float) -> float:
    """What each of n ranks sends for an op of logical volume `nbytes` with the ring algorithm
    (a point-to-point "send": its bytes)."""
    return nbytes if op == "send" else _RING_FACTOR[op] * (n - 1) / n * nbytes


def ring_steps(op: str, n: int) -> float:
    """Sequential transfers of the ring algorithm on n ranks (each paying one latency): 2(n-1) for
    an all-reduce, n-1 for an all-gather, a reduce-scatter or an all-to-all, 1 for a send."""
    return 1 if op == "send" else _RING_FACTOR[op] * (n - 1)


class CommMeter:
    """Logical bytes, ring wire bytes and calls per (op, group name) since the last reset."""

    def __init__(self) -> None:
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.wire_bytes: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)

    def record(self, op: str, group: str, nbytes: int) -> None:
        """Count one collective, or one point-to-point "send" (whose wire bytes are its bytes)."""
        self.bytes[(op, group)] += nbytes
        self.wire_bytes[(op, group)] += ring_wire_bytes(op, parallel_state.get_grid().size(group), nbytes)
        self.calls[(op, group)] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.wire_bytes.clear()
        self.calls.clear()

    def total(self, op: str | None = None, group: str | None = None, wire: bool = False) -> float:
        counts = self.wire_bytes if wire else self.bytes
        return sum(b for (o, g), b in counts.items() if op in (None, o) and group in (None, g))


METER = CommMeter()
_progress_hook: Callable[[], None] | None = None


def set_progress_hook(hook: Callable[[], None] | None) -> None:
    """Call `hook` after every collective completes (or is launched, for the asynchronous ones): the
    spawn helper's stall watchdog (distributed/spawn.py) learns from it that a rank is moving."""
    global _progress_hook
    _progress_hook = hook


def _progressed() -> None:
    if _progress_hook is not None:
        _progress_hook()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _alone(group: str) -> bool:
    return parallel_state.get_grid().size(group) == 1


def _nccl(group: str) -> bool:
    return dist.get_backend(parallel_state.get_group(group)) == "nccl"


def all_reduce(t: torch.Tensor, group: str = "tp", op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over the named group; returns t."""
    if _alone(group):
        return t
    METER.record("all_reduce", group, _nbytes(t))
    dist.all_reduce(t, op=op, group=parallel_state.get_group(group))
    _progressed()
    return t


def all_gather(t: torch.Tensor, dim: int, group: str = "tp") -> torch.Tensor:
    """Concatenate every rank's t along dim, in the group's rank order."""
    size = parallel_state.get_grid().size(group)
    if size == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t, group=parallel_state.get_group(group))
    out = torch.cat(parts, dim=dim)
    METER.record("all_gather", group, _nbytes(out))
    _progressed()
    return out


def reduce_scatter(t: torch.Tensor, dim: int, group: str = "tp") -> torch.Tensor:
    """Sum t over the group and keep this rank's chunk of dim."""
    size = parallel_state.get_grid().size(group)
    if size == 1:
        return t
    METER.record("reduce_scatter", group, _nbytes(t))
    if _nccl(group):
        chunks = [c.contiguous() for c in t.chunk(size, dim=dim)]
        out = torch.empty_like(chunks[0])
        dist.reduce_scatter(out, chunks, group=parallel_state.get_group(group))
        _progressed()
        return out
    full = t.contiguous().clone()
    dist.all_reduce(full, group=parallel_state.get_group(group))
    _progressed()
    return split(full, dim, group)


def split(t: torch.Tensor, dim: int, group: str = "tp") -> torch.Tensor:
    """This rank's chunk of dim (no communication): the inverse of all_gather."""
    grid = parallel_state.get_grid()
    size = grid.size(group)
    if size == 1:
        return t
    if t.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} does not split evenly over {size} ranks")
    return t.chunk(size, dim=dim)[grid.index(group)].contiguous()


def reduce_scatter_flat_async(data: torch.Tensor, group: str) -> dist.Work | None:
    """Start summing a flat buffer over the group so that at least this rank's 1/n chunk of it is
    reduced in place (gloo: all of it); wait on the returned work. None on a group of one."""
    if _alone(group):
        return None
    METER.record("reduce_scatter", group, _nbytes(data))
    _progressed()
    if _nccl(group):
        mine = data.chunk(parallel_state.get_grid().size(group))[parallel_state.get_grid().index(group)]
        return dist.reduce_scatter_tensor(mine, data, group=parallel_state.get_group(group), async_op=True)
    return dist.all_reduce(data, group=parallel_state.get_group(group), async_op=True)


def all_reduce_async(t: torch.Tensor, group: str) -> dist.Work | None:
    """Start an in-place all-reduce; wait on the returned work. None on a group of one."""
    if _alone(group):
        return None
    METER.record("all_reduce", group, _nbytes(t))
    _progressed()
    return dist.all_reduce(t, group=parallel_state.get_group(group), async_op=True)


def all_gather_flat_async(data: torch.Tensor, group: str) -> dist.Work | None:
    """Fill every 1/n chunk of a flat buffer from the rank that owns it (the inverse of
    reduce_scatter_flat_async's sharding), in place; wait on the returned work. None on a
    group of one."""
    if _alone(group):
        return None
    grid = parallel_state.get_grid()
    chunks = list(data.chunk(grid.size(group)))
    METER.record("all_gather", group, _nbytes(data))
    mine = chunks[grid.index(group)]
    if _nccl(group):
        work = dist.all_gather_into_tensor(data, mine, group=parallel_state.get_group(group), async_op=True)
    else:
        work = dist.all_gather(chunks, mine.clone(), group=parallel_state.get_group(group), async_op=True)
    _progressed()
    return work


def all_gather_flat(data: torch.Tensor, group: str) -> None:
    """all_gather_flat_async, waited for."""
    work = all_gather_flat_async(data, group)
    if work is not None:
        work.wait()


def send_recv_async(ops: list[tuple[str, torch.Tensor, int, int]], group: str) -> list[dist.Work]:
    """Post every ("send" or "recv", tensor, global peer rank, tag) together, in this order; wait on
    the returned works (so that compute can run while the tensors are in flight).

    Posting them at once is what lets two neighbours that both send before they receive go on;
    each side must list its operations in the same order as its peer does (NCCL matches by order).
    """
    if not ops:
        return []
    for kind, tensor, _, _ in ops:
        if kind == "send":
            METER.record("send", group, _nbytes(tensor))
    _progressed()
    return dist.batch_isend_irecv([dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, peer, tag=tag)
                                   for kind, t, peer, tag in ops])


def send_recv(ops: list[tuple[str, torch.Tensor, int, int]], group: str = "pp") -> None:
    """send_recv_async, then wait for all."""
    for work in send_recv_async(ops, group):
        work.wait()
    _progressed()


def all_to_all(t: torch.Tensor, split_dim: int, concat_dim: int, group: str) -> torch.Tensor:
    """Cut t into n equal chunks along split_dim, send chunk i to the group's i-th rank, and
    concatenate the chunks received, in rank order, along concat_dim (Ulysses' exchange)."""
    size = parallel_state.get_grid().size(group)
    if size == 1:
        return t
    if t.shape[split_dim] % size:
        raise ValueError(f"dimension {split_dim} of size {t.shape[split_dim]} does not split evenly over {size} ranks")
    send = torch.stack(t.chunk(size, dim=split_dim)).contiguous()
    recv = torch.empty_like(send)
    METER.record("all_to_all", group, _nbytes(t))
    dist.all_to_all_single(recv, send, group=parallel_state.get_group(group))
    _progressed()
    return torch.cat(recv.unbind(0), dim=concat_dim)


def all_to_all_rows(t: torch.Tensor, send_rows: list[int], recv_rows: list[int], group: str) -> torch.Tensor:
    """Send the first send_rows[0] rows of t to the group's rank 0, the next send_rows[1] to rank
    1, ...; the rows received, concatenated in rank order (recv_rows[i] from rank i). The token
    exchange of expert parallelism, where each rank sends each other rank a different number."""
    if parallel_state.get_grid().size(group) == 1:
        return t
    recv = t.new_empty((sum(recv_rows), *t.shape[1:]))
    METER.record("all_to_all", group, _nbytes(t))
    dist.all_to_all_single(recv, t.contiguous(), recv_rows, send_rows, group=parallel_state.get_group(group))
    _progressed()
    return recv


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()
        _progressed()


def all_gather_object(obj: object, group: str = "world") -> list:
    """Every rank's `obj` (picklable) of the group, in its rank order, on each of them; [obj] on a
    group of one. For host-side agreements (checkpoint files written, errors) and the small
    state a checkpoint collects, not for tensors on the training path."""
    if not dist.is_initialized() or parallel_state.get_grid().size(group) == 1:
        return [obj]
    gathered = [None] * parallel_state.get_grid().size(group)
    dist.all_gather_object(gathered, obj, group=parallel_state.get_group(group))
    _progressed()
    return gathered
