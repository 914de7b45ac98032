"""What a rank holds of each checkpointed tensor, as boxes of the full tensor that
torch.distributed.checkpoint (DCP) can write and read by global offset.

A rank's part of a parameter is its tp (or ep) shard, or, under the distributed optimizer, a
contiguous run of that shard's flattened elements (a piece cut from a flat bucket). Both are
described the same way: `(param, offset, tensor)`, `tensor` holding the flattened shard's
elements [offset, offset + numel). Such a run is a short list of boxes (a partial row, a
block of whole rows, a partial row, recursively), each contiguous, so a box is a view of the
tensor; shifted by where the shard sits in the full tensor it is a chunk DCP understands.

Why not DTensor or ShardedTensor: DTensor's placements cannot say "elements 1000..5000 of
the flattened tp shard" (the distributed optimizer's pieces) nor a strided split, and
ShardedTensor agrees on its metadata with a collective per tensor (over ranks that may not
hold it: pp stages hold different parameters). DCP's planner only needs, per key, the
global size and each rank's chunks (offsets and sizes): `Pieces` gives it exactly that
through the hooks DTensor uses (`__create_write_items__`, `__create_chunk_list__`), and the
two planners below find a chunk's tensor by its offsets. Loading at another layout asks
for this rank's boxes; DCP reads only the saved chunks that overlap them.

The full tensors are those of a single-device model, so they are the same at every layout:
- the SwiGLU fc1 weight ([gate; up], split over tp with stride 2) is two tensors, `/gate`
  and `/up`, each split plainly over tp;
- vocabulary tables are stored without their padding rows (which depend on tp), which load
  as zeros, as they are initialised.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.staging import AsyncStager

from megatron_lite import parallel_state
from megatron_lite.placement import full_shape, placement

HALVES = ("gate", "up")  # the blocks of a stride-2 tensor: the SwiGLU fc1's [gate; up]


def boxes(shape: tuple[int, ...], lo: int, hi: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The elements [lo, hi) of a row-major tensor of `shape` as (offsets, sizes) boxes, each
    contiguous, in order."""
    if lo >= hi:
        return []
    if not shape:
        return [((), ())]
    inner = math.prod(shape[1:])
    rest = (0,) * (len(shape) - 1)
    if lo % inner == 0 and hi % inner == 0:
        return [((lo // inner, *rest), (hi // inner - lo // inner, *shape[1:]))]
    out = []
    if lo % inner:  # the partial row lo starts in
        row, end = lo // inner, min(hi, (lo // inner + 1) * inner)
        out += [((row, *o), (1, *s)) for o, s in boxes(shape[1:], lo - row * inner, end - row * inner)]
        lo = end
    if hi // inner > -(-lo // inner):  # whole rows
        out.append(((lo // inner, *rest), (hi // inner - lo // inner, *shape[1:])))
        lo = hi // inner * inner
    if lo < hi:  # the partial row hi ends in
        row = lo // inner
        out += [((row, *o), (1, *s)) for o, s in boxes(shape[1:], lo - row * inner, hi - row * inner)]
    return out


@dataclass(frozen=True)
class Part:
    """One full tensor a parameter's local shard contributes to: its key, its shape, and where
    the shard's rows [lo, hi) of `dim` start in it (`origin`)."""
    key: str
    shape: tuple[int, ...]
    dim: int
    lo: int
    hi: int
    origin: tuple[int, ...]


def parts(name: str, param: nn.Parameter) -> list[Part]:
    """The full tensors `param`'s local shard belongs to (two for a stride-2 tensor), keyed by `name`."""
    where, grid = placement(param), parallel_state.get_grid()
    local, shape = tuple(param.shape), list(full_shape(param))
    origin = [0] * len(local)
    strided = None
    for s in where.shards:  # no parameter has two shards on one dim
        origin[s.dim] = grid.index(s.axis) * (local[s.dim] // s.stride)
        if s.stride > 1:
            assert s.stride == len(HALVES), f"{name}: stride {s.stride} has no block names"
            strided = s
    if where.unpadded_rows is not None:
        shape[0] = where.unpadded_rows
    if strided is None:
        return [Part(name, tuple(shape), 0, 0, local[0] if local else 1, tuple(origin))]
    d, half = strided.dim, local[strided.dim] // 2
    shape[d] //= 2
    return [Part(f"{name}/{h}", tuple(shape), d, i * half, (i + 1) * half, tuple(origin)) for i, h in enumerate(HALVES)]


def chunks(name: str, param: nn.Parameter, offset: int, tensor: torch.Tensor
           ) -> list[tuple[str, tuple[int, ...], tuple[int, ...], torch.Tensor]]:
    """(key, full shape, global offsets, view of `tensor`) of each box of the full tensors that
    `tensor`, the flattened local shard's elements from `offset` on, holds (see module docstring)."""
    flat, local, tensor_parts = tensor.reshape(-1), tuple(param.shape), parts(name, param)
    out = []
    for offsets, sizes in _leading_rows(boxes(local, offset, offset + flat.numel()),
                                        any(part.dim > 0 for part in tensor_parts)):
        start = sum(o * math.prod(local[i + 1:]) for i, o in enumerate(offsets)) - offset
        view = flat[start:start + math.prod(sizes)].view(sizes)
        for part in tensor_parts:
            lo = max(offsets[part.dim], part.lo) if offsets else 0
            hi = min(offsets[part.dim] + sizes[part.dim], part.hi) if offsets else 1
            if lo >= hi:
                continue
            piece = view.narrow(part.dim, lo - offsets[part.dim], hi - lo) if offsets else view
            at = list(offsets)
            if at:
                at[part.dim] = lo - part.lo
            at = [a + o for a, o in zip(at, part.origin)]
            if at and at[0] + piece.shape[0] > part.shape[0]:  # vocabulary padding rows: not stored
                if at[0] >= part.shape[0]:
                    continue
                piece = piece.narrow(0, 0, part.shape[0] - at[0])
            out.append((part.key, part.shape, tuple(at), piece))
    return out


def _leading_rows(found: list[tuple[tuple[int, ...], tuple[int, ...]]], split: bool
                  ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The boxes, each cut into its rows of dim 0 when `split`: a block cut along a later dim (an
    expert's [gate; up]) is then contiguous in each, so it is written without a copy (SavePlanner)."""
    if not split:
        return found
    return [((offsets[0] + i, *offsets[1:]), (1, *sizes[1:])) for offsets, sizes in found for i in range(sizes[0])]


def _exact(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor over a storage of its own bytes, sharing its memory. DCP copies a
    tensor whose storage holds more (torch.save would write all of it: a view's whole base) and
    keeps every copy until the rank's file is written, which for the fc1 halves' views would be
    a second copy of nearly half the rank's state."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    start = tensor.storage_offset() * tensor.element_size()
    storage = tensor.untyped_storage()[start:start + tensor.nbytes]  # a slice of a storage is a view of it
    return torch.empty(0, dtype=tensor.dtype).set_(storage, 0, tensor.shape, tensor.stride())


class Pieces:
    """One full tensor's chunks held by this rank: offsets -> tensor; what DCP writes or fills."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = torch.Size(shape)
        self.by_offset: dict[tuple[int, ...], torch.Tensor] = {}

    def size(self) -> torch.Size:  # DCP checks it against the saved size on load
        return self.shape

    def __create_write_items__(self, fqn: str, _obj: object) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(at)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(at), t.shape),
                                                      properties=TensorProperties.create_from_tensor(t),
                                                      size=self.shape))
                for at, t in self.by_offset.items()]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(at), t.shape) for at, t in self.by_offset.items()]


def collect(items: list[tuple[str, tuple[int, ...], tuple[int, ...], torch.Tensor]], into: dict) -> None:
    """Add chunks() results to a DCP state dict of Pieces."""
    for key, shape, at, tensor in items:
        into.setdefault(key, Pieces(shape)).by_offset[at] = tensor


def _lookup(state_dict: dict, index: MetadataIndex) -> torch.Tensor:
    obj = state_dict[index.fqn]
    return obj.by_offset[tuple(index.offset)] if isinstance(obj, Pieces) else obj


class SavePlanner(DefaultSavePlanner):
    """DCP's planner over a flat dict of Pieces and plain tensors (a plain tensor is whole; the
    ranks holding the same one write it once, DCP's deduplication)."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex) -> torch.Tensor:
        return _exact(_lookup(self.state_dict, index))


class LoadPlanner(DefaultLoadPlanner):
    """DCP's planner filling a flat dict of Pieces and plain tensors in place."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: dict, metadata=None, is_coordinator: bool = False) -> None:
        # DefaultLoadPlanner's would first replace every value it does not know (a Pieces) with
        # None, to materialise meta tensors; ours are never on the meta device.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return _lookup(self.state_dict, index)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        raise ValueError(f"{read_item.dest_index.fqn}: this checkpoint format stores tensors only")


class ReadyStager(AsyncStager):
    """async_save's staging step for a state already copied to host memory (save.py copies it)."""

    _synchronize_after_execute = False

    def stage(self, state_dict: dict) -> dict:
        return state_dict
