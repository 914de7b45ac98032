"""Resharding the torch format: a checkpoint saved under one layout (tp, pp, vpp, dp, distributed
optimizer on or off) loads under any other, weights and optimizer state both (AdamW's exp_avg,
exp_avg_sq and step; Muon's momentum_buffer and step: any elementwise state tensors an entry has,
beside its step).

The torch format (Megatron's legacy one) stores each rank's shard as it is in memory: the
llama fc1 weight strided (each tp rank holds its slice of the gate half and of the up half),
the distributed optimizer's Adam state cut from flat buckets across parameter boundaries,
padded per bucket. So each file records what is needed to undo its own sharding, and loading
goes through full tensors (the torch_dist format, torch_dist.py, stores the full tensors'
pieces instead, and needs none of this):

- `tp_layout`: per parameter name, its partition dim (None: replicated), stride and unpadded
  vocab rows, so no model has to be built to know how to unshard;
- `optimizer_index`: per optimizer state entry (in state_dict order), the parameter name and
  the range of the parameter's flattened elements it holds (all of them for the plain
  optimizer, a piece of one bucket shard for the distributed one).

Parameter names are global (layers keyed by their global number), so a name means the same
tensor under any pp or vpp. Every rank reads every file of the saved layout and keeps its own
slices: simple, and fine for models whose full state fits in host memory.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.comm import all_gather_object
from megatron_lite.distributed.data_parallel import materialized
from megatron_lite.lazy_tensors import IndexedTensors, LazyTensors
from megatron_lite.optimizer.optimizer import MainParam
from megatron_lite.placement import full_shape, is_expert, local_indices, local_shard, placement, unshard

REPLICATED_LAYOUT = {"partition_dim": None, "partition_stride": 1, "unpadded_rows": None}


@dataclass
class FullState:
    """A checkpoint independent of any layout: full, unpadded tensors keyed by global parameter name."""
    model: Mapping[str, torch.Tensor]
    optimizer: Mapping[str, dict[str, torch.Tensor]] | None  # name -> step and state tensors; None: weights only
    iteration: int
    consumed_samples: int
    rng: dict  # the RNG states of each (tp rank, pp rank) of the saved layout
    config: dict
    layout: dict  # the saved layout: tp, pp, vpp, dp, distributed_optimizer
    loss_scaler: dict | None = None  # --fp16's scaler state


def param_layout(param: nn.Parameter) -> dict:
    """How `param` is split over tp (from its placement), in the checkpoint's format; the same dict
    whatever the tp size."""
    where = placement(param)
    tp = where.shard("tp")
    return {"partition_dim": None if tp is None else tp.dim, "partition_stride": 1 if tp is None else tp.stride,
            "unpadded_rows": where.unpadded_rows}


def tp_layout(chunks: list[nn.Module]) -> dict[str, dict]:
    return {name: param_layout(p) for chunk in chunks for name, p in chunk.named_parameters()}


def _state_order(optimizer) -> list[MainParam]:
    """The optimizer's main tensors in the order torch's state_dict numbers them: group by group."""
    by_id = {id(t.main): t for t in optimizer.tensors}
    return [by_id[id(main)] for group in optimizer.optimizer.param_groups for main in group["params"]]


def optimizer_index(optimizer, chunks: list[nn.Module]) -> list[tuple[str, int, int]]:
    """(parameter name, first element, end element) of each optimizer state entry, in this rank's
    (tp and ep) shard of the parameter."""
    names = {id(p): name for chunk in chunks for name, p in chunk.named_parameters()}
    return [(names[id(t.param)], t.offset, t.offset + t.main.numel()) for t in _state_order(optimizer)]


def optimizer_checkpoint(optimizer, chunks: list[nn.Module], collect_experts: bool) -> tuple[dict, list]:
    """The optimizer's state dict and index as a file stores them. Experts are saved whole (the
    model file holds them gathered over ep), so their entries' ranges are moved to the full
    parameter: the ep shard is a block of dim 0, i.e. a contiguous run of the flattened tensor.
    `collect_experts` (the plain optimizer, whose file only the first dp x cp replica writes):
    the other ep ranks' expert entries are gathered and appended. Collective over ep."""
    state, index = optimizer.state_dict(), optimizer_index(optimizer, chunks)
    ep_rank = parallel_state.get_grid().index("ep")
    for i, t in enumerate(_state_order(optimizer)):
        if is_expert(t.param):
            name, lo, hi = index[i]
            index[i] = (name, lo + ep_rank * t.param.numel(), hi + ep_rank * t.param.numel())
    if collect_experts and parallel_state.get_grid().size("ep") > 1:
        mine = [(index[i], state["state"][i]) for i, t in enumerate(_state_order(optimizer))
                if is_expert(t.param) and i in state["state"]]
        for rank, entries in enumerate(all_gather_object(mine, group="ep")):
            for entry, entry_state in entries if rank != ep_rank else ():
                state["state"][len(index)] = entry_state
                index.append(entry)
    return state, index


def _moments(entry: dict) -> list[str]:
    """The state tensors of one optimizer entry shaped like its parameter (all but the step)."""
    return [key for key in entry if key != "step"]


def _assemble(by_rank: dict[int, torch.Tensor], layout: dict) -> torch.Tensor:
    """The full unpadded tensor from every tp rank's piece."""
    dim = layout["partition_dim"]
    full = by_rank[0] if dim is None else unshard([by_rank[r] for r in sorted(by_rank)], dim,
                                                  layout["partition_stride"])
    rows = layout["unpadded_rows"]
    return full if rows is None else full[:rows]


def read_legacy_state(files: dict[tuple[int, int], list[Path]], load: Callable[..., dict]) -> FullState:
    """A torch-format checkpoint as a FullState whose weights and optimizer state are assembled one
    parameter at a time, when asked for (so resharding it costs a rank one full tensor, not the model).

    `files[(tp_rank, pp_rank)]` is that shard's model file followed by its distrib_optim files (if
    any); `load(path, mmap=...)` reads one file (and names it in any error).
    """
    first = load(files[min(files)][0], mmap=True)
    rng = {at: load(paths[0], mmap=True)["rng"] for at, paths in files.items()}
    weights = LegacyTensors({at: paths[0] for at, paths in files.items()}, load)
    moments = LegacyMoments(files, weights, load)
    return FullState(weights, moments if moments.names else None, first["iteration"], first["consumed_samples"],
                     rng, first["config"], first["layout"], first.get("loss_scaler"))


class LegacyTensors(LazyTensors):
    """A torch-format checkpoint's full weights, each assembled from the tp files holding it when
    asked for. The files are mapped (torch.load's mmap) and opened again for each tensor, so only
    that tensor's bytes are read and none stay resident after."""

    def __init__(self, files: dict[tuple[int, int], Path], load: Callable[..., dict]) -> None:
        self.load, self.where, self.layouts = load, defaultdict(dict), {}
        self.local_shapes: dict[tuple[str, int], torch.Size] = {}  # (name, tp rank) -> that rank's piece's shape
        for (tp_rank, pp_rank), path in sorted(files.items()):
            state = load(path, mmap=True)
            self.layouts.update(state["tp_layout"])
            for chunk, chunk_state in enumerate(state["model"]):
                for name, tensor in chunk_state.items():
                    self.where[name][tp_rank] = (path, chunk)
                    self.local_shapes[name, tp_rank] = tensor.shape
        self.names = self.where

    def layout(self, name: str) -> dict:
        """How `name` is split over tp (persistent buffers have no entry: replicated)."""
        return self.layouts.get(name, REPLICATED_LAYOUT)

    def __getitem__(self, name: str) -> torch.Tensor:
        pieces = {r: self.load(path, mmap=True)["model"][chunk][name] for r, (path, chunk) in self.where[name].items()}
        return _assemble(pieces, self.layout(name)).clone()


class LegacyMoments(LazyTensors):
    """A torch-format checkpoint's optimizer state by parameter name: the step and each state tensor,
    full and unpadded, assembled when asked for from the ranges of it that the files hold (each file
    mapped and opened again per parameter, as LegacyTensors does)."""

    def __init__(self, files: dict[tuple[int, int], list[Path]], weights: LegacyTensors,
                 load: Callable[..., dict]) -> None:
        self.load, self.weights = load, weights
        self.ranges: dict[str, list[tuple[int, Path, int, int, int]]] = defaultdict(list)
        for (tp_rank, _), paths in sorted(files.items()):
            for path in paths[1:] or paths[:1]:  # the distrib_optim files, else the model file itself
                saved = load(path, mmap=True)
                if saved["optimizer"] is None:
                    continue
                for i, (name, lo, hi) in enumerate(saved["optimizer_index"]):
                    if i in saved["optimizer"]["state"]:  # no entry before the first step
                        self.ranges[name].append((tp_rank, path, i, lo, hi))
        self.names = self.ranges

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        """A parameter not split over tp has one buffer that every tp rank's files fill: an expert's
        Adam state is sharded over edp, which may take tp ranks, so one tp rank's files need not cover it."""
        layout, flat, step = self.weights.layout(name), {}, None
        for tp_rank, path, i, lo, hi in self.ranges[name]:
            entry = self.load(path, mmap=True)["optimizer"]["state"][i]
            key = tp_rank if layout["partition_dim"] is not None else 0
            numel = self.weights.local_shapes[name, tp_rank].numel()
            buffers = flat.setdefault(key, {k: torch.zeros(numel) for k in _moments(entry)})
            for moment, buffer in buffers.items():
                buffer[lo:hi] = entry[moment].flatten()
            step = entry["step"].clone()
        moments = {k: _assemble({r: b[k].view(self.weights.local_shapes[name, r]) for r, b in flat.items()}, layout)
                   for k in _moments(flat[min(flat)])}
        return {**moments, "step": step}


def _local(full: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """This rank's piece of a full unpadded tensor shaped like `param`: pad the vocab rows with zeros, slice."""
    shape = full_shape(param)
    if full.shape[0] != shape[0]:
        full = torch.cat([full, full.new_zeros(shape[0] - full.shape[0], *full.shape[1:])])
    return local_shard(full, param).clone()  # a copy: a view would keep the whole tensor alive


def _read_local(model: dict[str, torch.Tensor], name: str, param: nn.Parameter) -> torch.Tensor:
    """_local of model[name], read alone when `model` can (IndexedTensors: the full tensor is never made)."""
    if not isinstance(model, IndexedTensors):
        return _local(model[name], param)
    index = local_indices(param)
    rows = placement(param).unpadded_rows
    real = index[0] if rows is None else index[0][index[0] < rows]  # the padding rows are the last ones
    piece = model.select(name, [real, *index[1:]])
    padding = len(index[0]) - len(real)
    return torch.cat([piece, piece.new_zeros(padding, *piece.shape[1:])]) if padding else piece


def load_weights(model: dict[str, torch.Tensor], chunks: list[nn.Module], optimizer=None) -> None:
    """Copy this rank's slices of full unpadded weights, keyed by global name, into the chunks
    (and the persistent buffers `model` has) and, given the optimizer, their unrounded values
    into its fp32 main copies. Each slice is copied as it is read: without an optimizer no more
    than one is held beside the model."""
    weights = {}
    with torch.no_grad():
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                weight = _read_local(model, name, param)
                if materialized(param):  # a ZeRO-3 parameter gets its shard through the optimizer
                    param.copy_(weight)
                if optimizer is not None:
                    weights[param] = weight
        for chunk in chunks:
            for name, buffer in chunk.named_buffers():
                if name in model:
                    buffer.copy_(model[name])
    if optimizer is not None:
        optimizer.load_main_weights(weights)


def load_full_state(full: FullState, chunks: list[nn.Module], optimizer) -> None:
    """Copy this rank's slices of `full` into the chunks, the main weights and, when it has Adam
    state, the optimizer."""
    load_weights(full.model, chunks, optimizer)
    if full.optimizer is None:
        return
    state, saved, last = {}, None, None
    for i, (t, (name, lo, hi)) in enumerate(zip(_state_order(optimizer), optimizer_index(optimizer, chunks))):
        if name != last:  # a lazy state assembles a parameter's tensors once, however many ranges it has here
            saved, last = full.optimizer[name], name
        state[i] = {"step": saved["step"].clone(),
                    **{k: _local(saved[k], t.param).flatten()[lo:hi].view_as(t.main).clone() for k in _moments(saved)}}
    state_dict = optimizer.state_dict()
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)
