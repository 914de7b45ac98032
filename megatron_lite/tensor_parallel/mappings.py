"""Collectives, metered, and the autograd mappings of Megatron's tensor parallelism built on them.

Each mapping is a pair of conjugate operations: what forward does, and what backward must do
so that gradients are those of the unsharded model. From the Megatron-LM paper:

  copy_to_tensor_model_parallel_region       f: identity       / all-reduce   (input of a column-parallel linear)
  reduce_from_tensor_model_parallel_region   g: all-reduce     / identity     (output of a row-parallel linear)
  scatter_to_tensor_model_parallel_region       split last dim / all-gather
  gather_from_tensor_model_parallel_region      all-gather     / split last dim

and for sequence parallelism, where activations outside the tensor-parallel regions are
split along the sequence (dim 1 of our [batch, seq, hidden] tensors):

  gather_from_sequence_parallel_region          all-gather     / reduce-scatter
  reduce_scatter_to_sequence_parallel_region    reduce-scatter / all-gather
  scatter_to_sequence_parallel_region           split seq      / all-gather

Every collective goes through the functions below, which count it in METER twice over:
`bytes`, the logical volume (the tensor of an all-reduce, the gathered output of an
all-gather, the unreduced input of a reduce-scatter), and `wire_bytes`, what each rank sends
with the ring algorithm on n ranks: 2(n-1)/n of the volume for an all-reduce, (n-1)/n for an
all-gather or a reduce-scatter. An all-reduce is a reduce-scatter followed by an all-gather,
which is why sequence parallelism costs no more communication than the all-reduces it replaces.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_lite import parallel_state

SEQ_DIM = 1


_RING_FACTOR = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0}


class CommMeter:
    """Logical bytes, ring wire bytes and calls per (op, group kind) since the last reset."""

    def __init__(self) -> None:
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.wire_bytes: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)

    def record(self, op: str, group: str, nbytes: int) -> None:
        """Count one collective, or one point-to-point "send" (whose wire bytes are its bytes)."""
        n = parallel_state.get_grid().size(group)
        self.bytes[(op, group)] += nbytes
        self.wire_bytes[(op, group)] += nbytes if op == "send" else _RING_FACTOR[op] * (n - 1) / n * nbytes
        self.calls[(op, group)] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.wire_bytes.clear()
        self.calls.clear()

    def total(self, op: str | None = None, group: str | None = None, wire: bool = False) -> float:
        counts = self.wire_bytes if wire else self.bytes
        return sum(b for (o, g), b in counts.items() if op in (None, o) and group in (None, g))


METER = CommMeter()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce(t: torch.Tensor, group: str = "tp", op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over the named group; a no-op on a group of one."""
    if parallel_state.get_grid().size(group) == 1:
        return t
    METER.record("all_reduce", group, _nbytes(t))
    dist.all_reduce(t, op=op, group=parallel_state.get_group(group))
    return t


def all_gather(t: torch.Tensor, dim: int, group: str = "tp") -> torch.Tensor:
    """Concatenate every rank's t along dim, in rank order."""
    size = parallel_state.get_grid().size(group)
    if size == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t, group=parallel_state.get_group(group))
    out = torch.cat(parts, dim=dim)
    METER.record("all_gather", group, _nbytes(out))
    return out


def reduce_scatter(t: torch.Tensor, dim: int, group: str = "tp") -> torch.Tensor:
    """Sum t over the group and keep this rank's chunk of dim."""
    size = parallel_state.get_grid().size(group)
    if size == 1:
        return t
    METER.record("reduce_scatter", group, _nbytes(t))
    pg = parallel_state.get_group(group)
    if dist.get_backend(pg) == "nccl":
        chunks = [c.contiguous() for c in t.chunk(size, dim=dim)]
        out = torch.empty_like(chunks[0])
        dist.reduce_scatter(out, chunks, group=pg)
        return out
    # gloo has no reduce-scatter: all-reduce and keep our chunk. Same result, and the meter
    # records the volume a real reduce-scatter moves.
    full = t.contiguous().clone()
    dist.all_reduce(full, group=pg)
    return split(full, dim, group)


def split(t: torch.Tensor, dim: int, group: str = "tp") -> torch.Tensor:
    """This rank's chunk of dim (no communication)."""
    grid = parallel_state.get_grid()
    size = grid.size(group)
    if size == 1:
        return t
    if t.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} does not split evenly over {size} ranks")
    rank = {"tp": grid.tp_rank, "dp": grid.dp_rank, "pp": grid.pp_rank}[group]
    return t.chunk(size, dim=dim)[rank].contiguous()


class _Conjugate(torch.autograd.Function):
    """Apply `forward_fn` going forward and `backward_fn` to the gradient going back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_fn: Callable, backward_fn: Callable) -> torch.Tensor:
        ctx.backward_fn = backward_fn
        return forward_fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.backward_fn(grad), None, None


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _all_reduce_copy(t: torch.Tensor) -> torch.Tensor:
    # Autograd must not see its input modified in place.
    return all_reduce(t.clone())


def _last(fn: Callable) -> Callable:
    return lambda t: fn(t, t.dim() - 1)


def _seq(fn: Callable) -> Callable:
    return lambda t: fn(t, SEQ_DIM)


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _Conjugate.apply(x, _identity, _all_reduce_copy)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _Conjugate.apply(x, _all_reduce_copy, _identity)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _Conjugate.apply(x, _last(split), _last(all_gather))


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _Conjugate.apply(x, _last(all_gather), _last(split))


def gather_from_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _Conjugate.apply(x, _seq(all_gather), _seq(reduce_scatter))


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _Conjugate.apply(x, _seq(reduce_scatter), _seq(all_gather))


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _Conjugate.apply(x, _seq(split), _seq(all_gather))
