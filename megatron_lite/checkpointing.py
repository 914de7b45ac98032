"""Checkpoints: iter_NNNNNNN/ directories plus a marker naming the latest, as Megatron lays them out.

    SAVE_DIR/
      latest_checkpointed_iteration.txt    the iteration number, written last
      iter_0000100/
        mp_rank_00/model_optim_rng.pt      tp rank 00's shard: model, optimizer, iteration,
        mp_rank_01/model_optim_rng.pt      consumed samples, RNG state, the config and layout
                                           it was saved with, and how to unshard it

One file per tensor-parallel rank (mp_rank_TT_PPP with pipeline stages; Megatron's names),
written by data-parallel rank 0: the other replicas hold the same values. With the
distributed optimizer each data-parallel rank holds different Adam state, so each also writes
distrib_optim_DDD.pt beside it.

A save goes to a temporary directory that is renamed into place, and the marker is replaced
atomically after it, so a crash mid-save leaves the previous checkpoint and marker intact.
Loading uses torch.load(weights_only=True): a checkpoint can hold only tensors and plain
containers, never code. A checkpoint saved under another layout is resharded on load
(megatron_lite/reshard.py); one without optimizer state (`finetune`, as written by
tools/convert_checkpoint.py from-hf) starts training at iteration 0 with a fresh optimizer.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.config import Config, ConfigError, ModelConfig, ParallelConfig, TrainConfig
from megatron_lite.reshard import FullState, load_full_state, optimizer_index, read_full_state, tp_layout

MARKER = "latest_checkpointed_iteration.txt"
FILENAME = "model_optim_rng.pt"
# Fields that fix the shapes of the weights: a checkpoint only loads into the same values.
SHAPE_FIELDS = ("family", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings")


def checkpoint_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def shard_file(root: str | Path, iteration: int, tp_rank: int, pp_rank: int, pp: int) -> Path:
    """The model file of one (tp, pp) shard: mp_rank_TT, or mp_rank_TT_PPP when there are pipeline stages."""
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
    return checkpoint_dir(root, iteration) / name / FILENAME


def rank_file(root: str | Path, iteration: int) -> Path:
    grid = parallel_state.get_grid()
    return shard_file(root, iteration, grid.tp_rank, grid.pp_rank, grid.pp)


def optimizer_file(model_file: Path, dp_rank: int) -> Path:
    return model_file.with_name(f"distrib_optim_{dp_rank:03d}.pt")


def current_layout(config: Config) -> dict:
    grid = parallel_state.get_grid()
    return {"tp": grid.tp, "pp": grid.pp, "vpp": config.parallel.vpp, "dp": grid.dp,
            "distributed_optimizer": config.parallel.use_distributed_optimizer}


def _same_layout(saved: dict, ours: dict) -> bool:
    # dp decides which file holds what only when the Adam state is sharded over it.
    keys = ["tp", "pp", "vpp", "distributed_optimizer"] + (["dp"] if ours["distributed_optimizer"] else [])
    return all(saved[k] == ours[k] for k in keys)


def describe_layout(layout: dict) -> str:
    return (f"tp={layout['tp']} pp={layout['pp']} vpp={layout['vpp']} dp={layout['dp']} distributed optimizer "
            f"{'on' if layout['distributed_optimizer'] else 'off'}")


def saved_config(config: dict) -> Config:
    """The Config a checkpoint was saved with, from its "config" entry."""
    return Config(model=ModelConfig(**config["model"]), parallel=ParallelConfig(**config["parallel"]),
                  train=TrainConfig(**config["train"]))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(root: str | Path, iteration: int, consumed_samples: int, chunks: list[nn.Module],
                    optimizer, config: Config) -> Path:
    """Write this rank's part of iter_NNNNNNN atomically; optimizer=None writes weights only (`finetune`)."""
    grid = parallel_state.get_grid()
    final = checkpoint_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if grid.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel_state.barrier()
    path = tmp / rank_file(root, iteration).relative_to(final)
    sharded = config.parallel.use_distributed_optimizer and optimizer is not None
    local = optimizer is not None and not sharded
    if grid.dp_rank == 0:
        path.parent.mkdir()
        torch.save({"iteration": iteration, "consumed_samples": consumed_samples,
                    "model": [c.state_dict() for c in chunks], "tp_layout": tp_layout(chunks),
                    "optimizer": optimizer.state_dict() if local else None,
                    "optimizer_index": optimizer_index(optimizer, chunks) if local else None,
                    "finetune": optimizer is None, "layout": current_layout(config),
                    "rng": _rng_state(), "config": dataclasses.asdict(config)}, path)
    parallel_state.barrier()
    if sharded:
        torch.save({"optimizer": optimizer.state_dict(), "optimizer_index": optimizer_index(optimizer, chunks)},
                   optimizer_file(path, grid.dp_rank))
    parallel_state.barrier()
    if grid.rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker_tmp = Path(root) / (MARKER + ".tmp")
        marker_tmp.write_text(str(iteration))
        os.replace(marker_tmp, Path(root) / MARKER)
        if config.train.keep_last:
            prune_checkpoints(root, config.train.keep_last)
    parallel_state.barrier()
    return final


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    """Delete all but the keep_last most recent iter_ directories (the marked one is the most recent)."""
    saved = sorted(p for p in Path(root).iterdir() if re.fullmatch(r"iter_\d{7}", p.name))
    for path in saved[:-keep_last]:
        shutil.rmtree(path)


def latest_iteration(root: str | Path) -> int | None:
    marker = Path(root) / MARKER
    if not marker.exists():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ConfigError(f"{marker} holds {text!r}, not an iteration number")
    return int(text)


def load_file(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign files surface as many exception types
        raise ConfigError(f"cannot read checkpoint {path}: {exc}") from exc


def _check_shape(saved_config: dict, config: Config, where: Path) -> None:
    saved = saved_config["model"]
    for name in SHAPE_FIELDS:
        ours = getattr(config.model, name)
        if saved.get(name) != ours:
            raise ConfigError(f"checkpoint {where} has {name}={saved.get(name)} but this run has {name}={ours}")


def first_file(root: str | Path, iteration: int) -> Path:
    """The model file of tp rank 0 on the first stage, whatever the layout: it holds the layout and config."""
    with_stages = any(checkpoint_dir(root, iteration).glob("mp_rank_00_*"))
    return shard_file(root, iteration, 0, 0, 2 if with_stages else 1)


def read_checkpoint(root: str | Path, iteration: int) -> FullState:
    """Every file of a saved checkpoint, whatever its layout, as full tensors."""
    layout = load_file(first_file(root, iteration))["layout"]
    files = {}
    for tp_rank in range(layout["tp"]):
        for pp_rank in range(layout["pp"]):
            model_file = shard_file(root, iteration, tp_rank, pp_rank, layout["pp"])
            dp_files = ([optimizer_file(model_file, d) for d in range(layout["dp"])]
                        if layout["distributed_optimizer"] else [])
            files[(tp_rank, pp_rank)] = [model_file, *dp_files]
    return read_full_state(files, load_file)


def load_checkpoint(root: str | Path, chunks: list[nn.Module], optimizer, config: Config) -> tuple[int, int]:
    """Restore in place; returns (iteration, consumed_samples). (0, 0) for a directory with no checkpoint
    or a weights-only one."""
    iteration = latest_iteration(root)
    if iteration is None:
        parallel_state.print_rank_0(f"WARNING: --load={root} has no {MARKER}; training starts from scratch")
        return 0, 0
    path = rank_file(root, iteration)
    state = load_file(path) if path.exists() else None
    if state is None or state["finetune"] or not _same_layout(state["layout"], current_layout(config)):
        return _load_resharded(root, iteration, chunks, optimizer, config)
    _check_shape(state["config"], config, path)
    for chunk, chunk_state in zip(chunks, state["model"]):
        chunk.load_state_dict(chunk_state)
    if config.parallel.use_distributed_optimizer:
        optimizer.load_state_dict(load_file(optimizer_file(path, parallel_state.get_data_parallel_rank()))["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    return state["iteration"], state["consumed_samples"]


def _load_resharded(root: str | Path, iteration: int, chunks: list[nn.Module], optimizer,
                    config: Config) -> tuple[int, int]:
    """Load through full tensors: another layout, or weights only."""
    where = checkpoint_dir(root, iteration)
    full = read_checkpoint(root, iteration)
    _check_shape(full.config, config, where)
    if full.optimizer is None:
        parallel_state.print_rank_0(f"> loading weights only from {where} (no optimizer state): training starts "
                                    "at iteration 0 with a fresh optimizer")
    else:
        parallel_state.print_rank_0(f"> resharding checkpoint {where} saved with {describe_layout(full.layout)} "
                                    f"to {describe_layout(current_layout(config))}")
    load_full_state(full, chunks, optimizer)
    if full.optimizer is None:
        return 0, 0
    _set_rng_state(full.rng)
    return full.iteration, full.consumed_samples


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
