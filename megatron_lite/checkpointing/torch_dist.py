"""The torch_dist checkpoint format (the default, Megatron-Core's name): torch.distributed.checkpoint.

    iter_0000100/
      __R_0.distcp      rank R's pieces of the weights and Adam state, by global offset (DCP)
      .metadata         DCP's index: every tensor's full shape and who wrote which chunk
      common.pt         iteration, consumed samples, config, layout, loss scale, RNG states
      metadata.json     which format this is (Megatron's file)
      manifest.json     every file's size and CRC-32 (manifest.py)

Every tensor is stored as the single-device model's (pieces.py): weights under
`model/NAME`, Adam's moments under `optimizer/exp_avg/NAME` and `optimizer/exp_avg_sq/NAME`
(the same shape as the weight), its step under `optimizer/step/NAME`. Each rank writes what
it holds and no other rank holds first: its tp/ep shard of each parameter (from the first
data-parallel replica, or every replica's own piece under the distributed optimizer, whose
fp32 main copies are the weights). Loading, at this layout or any other, asks DCP for this
rank's pieces only; DCP reads the saved chunks that overlap them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from megatron_lite import comm, parallel_state
from megatron_lite.checkpointing.pieces import HALVES, LoadPlanner, Pieces, ReadyStager, SavePlanner, chunks, collect
from megatron_lite.checkpointing.reshard import FullState, _moments, _state_order, param_layout
from megatron_lite.config import Config, ConfigError
from megatron_lite.distributed.data_parallel import GRAD_GROUP, materialized
from megatron_lite.lazy_tensors import LazyTensors
from megatron_lite.optimizer.optimizer import STATE_TENSORS
from megatron_lite.placement import counted_here, is_expert

COMMON = "common.pt"
FORMAT_FILE = "metadata.json"
FORMAT = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
          "common_backend_version": 1}


def is_torch_dist(directory: Path) -> bool:
    return (directory / FORMAT_FILE).exists()


@contextlib.contextmanager
def _one_process(group: dist.ProcessGroup | None):
    """Without ranks (group None) DCP warns that it assumes one process; that is meant here."""
    with warnings.catch_warnings():
        if group is None:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def io_group(config: Config) -> dist.ProcessGroup | None:
    """A gloo group of every rank for checkpoint I/O (None in one process). DCP plans over it,
    from a background thread under --async-save: a group of its own keeps those collectives
    from interleaving with training's; gloo, since what is written is in host memory."""
    if not dist.is_initialized():
        return None
    grid = parallel_state.get_grid()
    if "checkpoint_io" not in grid.groups:  # collective: every rank saves or loads together
        grid.groups["checkpoint_io"] = dist.new_group(
            backend="gloo", timeout=timedelta(minutes=config.parallel.distributed_timeout_minutes))
    return grid.groups["checkpoint_io"]


def _names(model_chunks: list[nn.Module]) -> dict[nn.Parameter, str]:
    return {p: name for chunk in model_chunks for name, p in chunk.named_parameters()}


def _buffers(model_chunks: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The persistent buffers (an MoE router's expert bias): whole on every rank that has them."""
    return {name: t for chunk in model_chunks for name, t in chunk.state_dict().items()
            if name not in dict(chunk.named_parameters())}


def save_state(model_chunks: list[nn.Module], optimizer, sharded: bool, moments: bool = True) -> dict:
    """This rank's DCP state dict (see the module docstring). optimizer=None: weights only; moments=False
    (--no-save-optim): the optimizer's fp32 main weights but not its state."""
    grid, names = parallel_state.get_grid(), _names(model_chunks)

    def writes(param: nn.Parameter) -> bool:  # the first holder of each piece writes it
        return counted_here(param) and (sharded or grid.index("edp" if is_expert(param) else GRAD_GROUP) == 0)

    if sharded:  # the fp32 main pieces: no gather
        weights = [(t.param, t.offset, t.main) for t in optimizer.tensors]
    else:
        main = optimizer.main_weights() if optimizer is not None else {}
        weights = [(p, 0, main.get(p, p).detach()) for p in names]
    state = {f"model/{name}": t for name, t in _buffers(model_chunks).items()}
    for param, offset, tensor in weights:
        if writes(param):
            collect(chunks(f"model/{names[param]}", param, offset, tensor), state)
    if optimizer is not None and moments:
        saved = optimizer.state_dict()["state"]
        for i, t in enumerate(_state_order(optimizer)):
            if i in saved and writes(t.param):  # no entry before the first step
                for k in _moments(saved[i]):
                    collect(chunks(f"optimizer/{k}/{names[t.param]}", t.param, t.offset, saved[i][k]), state)
                state[f"optimizer/step/{names[t.param]}"] = saved[i]["step"]
    return state


def copied(state: dict) -> dict:
    """`state` with every tensor copied to host memory (what a background save writes)."""
    out = {}
    for key, value in state.items():
        if isinstance(value, Pieces):
            out[key] = Pieces(tuple(value.shape))
            out[key].by_offset = {at: t.detach().to("cpu", copy=True) for at, t in value.by_offset.items()}
        else:
            out[key] = value.detach().to("cpu", copy=True)
    return out


def common_state(iteration: int, consumed_samples: int, model_chunks: list[nn.Module], optimizer, config: Config,
                 layout: dict) -> dict | None:
    # "optimizer_state": False under --no-save-optim; a checkpoint from before the key holds it unless finetune.
    """common.pt's contents, on rank 0 (None elsewhere), with every parameter's tp layout gathered (collective)."""
    layouts = comm.all_gather_object({name: param_layout(p) for p, name in _names(model_chunks).items()})
    if parallel_state.get_grid().rank != 0:
        return None
    scaler = None if optimizer is None or optimizer.loss_scaler is None else optimizer.loss_scaler.state_dict()
    return {"iteration": iteration, "consumed_samples": consumed_samples, "finetune": optimizer is None,
            "optimizer_state": optimizer is not None and not config.train.no_save_optim,
            "layout": layout, "config": dataclasses.asdict(config), "loss_scaler": scaler,
            "tp_layout": {k: v for mine in layouts for k, v in mine.items()}}


def rng_entries(rng: dict) -> dict[str, torch.Tensor]:
    """The RNG states as DCP tensors `rng/TP_PP/...`, from each (tp, pp) position's first data-parallel replica."""
    grid = parallel_state.get_grid()
    if grid.index(GRAD_GROUP) != 0:
        return {}
    prefix = f"rng/{grid.coord('tp')}_{grid.coord('pp')}/"
    tensors = {"torch": rng["torch"], **({"cuda": rng["cuda"]} if "cuda" in rng else {}),
               **{f"tracker/{name}": t for name, t in rng["tracker"].items()}}
    return {prefix + k: t for k, t in tensors.items()}


def _rng_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict:
    """rng_entries' inverse for one position."""
    mine = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
    return {"torch": mine["torch"], **({"cuda": mine["cuda"]} if "cuda" in mine else {}),
            "tracker": {k[len("tracker/"):]: t for k, t in mine.items() if k.startswith("tracker/")}}


def start_write(directory: Path, state: dict, common: dict | None, config: Config, background: bool):
    """Write this rank's pieces (and, on rank 0, common.pt and metadata.json) into `directory`.
    Returns a function that waits for the write and returns this rank's files."""
    rank = parallel_state.get_grid().rank
    kwargs = dict(storage_writer=FileSystemWriter(directory, thread_count=1), planner=SavePlanner(),
                  process_group=io_group(config))
    kwargs["no_dist"] = kwargs["process_group"] is None
    with _one_process(kwargs["process_group"]):
        future = dcp.async_save(state, async_stager=ReadyStager(), **kwargs) if background else None

    def files() -> list[Path]:
        if common is not None:
            torch.save(common, directory / COMMON)
            (directory / FORMAT_FILE).write_text(json.dumps(FORMAT))
        try:
            with _one_process(kwargs["process_group"]):
                future.result() if future is not None else dcp.save(state, **kwargs)
        except CheckpointException as exc:  # DCP's, raised on every rank: each reports its own failure
            own = exc.failures.get(rank)
            if own is None:
                return []
            raise own[0] from None
        mine = sorted(directory.glob(f"__{rank}_*.distcp"))
        return mine + ([directory / ".metadata", directory / COMMON, directory / FORMAT_FILE] if rank == 0 else [])
    return files


def _first_failure(exc: BaseException) -> str:
    if isinstance(exc, CheckpointException):
        exc = next(iter(exc.failures.values()))[0]
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _load(directory: Path, state: dict, group) -> None:
    try:
        with _one_process(group):
            dcp.load(state, storage_reader=FileSystemReader(directory), planner=LoadPlanner(), process_group=group,
                     no_dist=group is None)
    except (Exception, CheckpointException) as exc:  # a file damaged after its manifest was checked, or unlisted
        raise ConfigError(f"cannot read checkpoint {directory}: {_first_failure(exc)}") from None


def _saved(directory: Path) -> dict:
    """DCP's index of a checkpoint: key -> its full size, dtype and chunks."""
    try:
        return FileSystemReader(directory).read_metadata().state_dict_metadata
    except Exception as exc:
        raise ConfigError(f"cannot read checkpoint {directory / '.metadata'}: {_first_failure(exc)}") from None


def _empty(saved: dict, key: str) -> torch.Tensor:
    return torch.empty(saved[key].size, dtype=saved[key].properties.dtype)


def _holds(saved, key: str) -> bool:
    """Whether the checkpoint has tensor `key`, whole or as fc1's gate and up halves."""
    return key in saved or f"{key}/{HALVES[0]}" in saved


def load_into(directory: Path, model_chunks: list[nn.Module], optimizer, config: Config, with_optimizer: bool,
              rng_at: tuple[int, int] | None) -> dict | None:
    """Fill the chunks' weights, the optimizer's main copies and, `with_optimizer`, its state with
    this rank's pieces; returns the RNG states saved at the (tp, pp) position `rng_at` (None: none).
    Collective."""
    names, saved = _names(model_chunks), _saved(directory)
    state = {f"model/{name}": t for name, t in _buffers(model_chunks).items() if f"model/{name}" in saved}
    prefix = None if rng_at is None else f"rng/{rng_at[0]}_{rng_at[1]}/"
    rng = {k: _empty(saved, k) for k in saved if prefix is not None and k.startswith(prefix)}
    state.update(rng)
    # The files hold fp32 (main) weights: an fp32 parameter is read into in place, any other (--bf16,
    # --fp16) through an fp32 copy. Zeros first: what no file holds (vocabulary padding rows) loads as zeros.
    weights = {p: p.detach().zero_() if p.dtype == torch.float32 else torch.zeros(p.shape)
               for p in names if materialized(p)}
    for param, tensor in weights.items():
        collect(chunks(f"model/{names[param]}", param, 0, tensor), state)
    for t in optimizer.tensors if optimizer is not None else ():
        if not materialized(t.param):  # ZeRO-3: only this rank's piece exists, the main copy
            t.main.zero_()
            collect(chunks(f"model/{names[t.param]}", t.param, t.offset, t.main), state)
    moments = {}
    if with_optimizer:
        for i, t in enumerate(_state_order(optimizer)):
            name = names[t.param]
            if f"optimizer/step/{name}" not in saved:
                continue
            kinds = [k for k in STATE_TENSORS if _holds(saved, f"optimizer/{k}/{name}")]
            moments[i] = {"step": torch.zeros(()), **{k: torch.zeros_like(t.main) for k in kinds}}
            for k in kinds:
                collect(chunks(f"optimizer/{k}/{name}", t.param, t.offset, moments[i][k]), state)
            state[f"optimizer/step/{name}"] = moments[i]["step"]
    _load(directory, state, io_group(config))
    with torch.no_grad():
        for param, tensor in weights.items():
            if tensor.dtype != param.dtype:
                param.copy_(tensor)
    if optimizer is not None:
        optimizer.load_main_weights(weights)
    if with_optimizer:
        state_dict = optimizer.state_dict()
        state_dict["state"] = moments
        optimizer.load_state_dict(state_dict)
    return None if prefix is None else _rng_state(rng, prefix)


def split_dims(common: dict) -> dict[str, int]:
    """From common.pt: the dim along which each parameter is split over tp (that joins gate and up)."""
    return {name: layout["partition_dim"] or 0 for name, layout in common["tp_layout"].items()}


class SavedTensors(LazyTensors):
    """A torch_dist checkpoint's full tensors, each read when asked for (one process, no ranks); as
    a mapping, the model's weights by name."""

    def __init__(self, directory: Path, dims: dict[str, int] | None = None) -> None:
        """`dims`: the tp partition dim of each split (gate/up) tensor, which joins its halves."""
        self.directory, self.dims = directory, dims or {}
        self.metadata = _saved(directory)
        self.names = self.names_under("model/")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(f"model/{name}", self.dims.get(name, 0))


    def names_under(self, prefix: str) -> list[str]:
        """The names under `prefix` (model/ or optimizer/exp_avg/ ...), the halves of a split tensor as one."""
        names = {k[len(prefix):] for k in self.metadata if k.startswith(prefix)}
        return sorted({n.rsplit("/", 1)[0] if n.endswith(tuple(f"/{h}" for h in HALVES)) else n for n in names})

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        state = {k: _empty(self.metadata, k) for k in keys}
        _load(self.directory, state, None)
        return state

    def get(self, key: str, dim: int = 0) -> torch.Tensor:
        """The full tensor `key`; a split one's halves joined along `dim` (its tp partition dim)."""
        if key in self.metadata:
            return self.read([key])[key]
        halves = self.read([f"{key}/{h}" for h in HALVES])
        return torch.cat(list(halves.values()), dim=dim)


def read_full(directory: Path, load) -> FullState:
    """Every tensor of a torch_dist checkpoint, full (for tools and tests on small models)."""
    common = load(directory / COMMON)
    saved = SavedTensors(directory, split_dims(common))
    dims = saved.dims
    tensors = saved.read([k for k in saved.metadata if k.startswith("rng/")])
    positions = {k.split("/")[1] for k in tensors}
    rng = {tuple(int(i) for i in at.split("_")): _rng_state(tensors, f"rng/{at}/") for at in positions}
    model = dict(saved)
    optimizer = None
    if not common["finetune"]:
        optimizer = {name: {k: saved.get(f"optimizer/{k}/{name}", dims.get(name, 0)) for k in STATE_TENSORS
                            if _holds(saved.metadata, f"optimizer/{k}/{name}")}
                     for name in saved.names_under("optimizer/step/")}
        for name in optimizer:
            optimizer[name]["step"] = saved.get(f"optimizer/step/{name}")
    return FullState(model, optimizer, common["iteration"], common["consumed_samples"], rng,
                     common["config"], common["layout"], common.get("loss_scaler"))
