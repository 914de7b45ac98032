"""Checkpoints: iter_NNNNNNN/ directories plus a marker naming the latest, as Megatron lays them out.

    SAVE_DIR/
      latest_checkpointed_iteration.txt    the iteration number, written last
      iter_0000100/
        mp_rank_00/model_optim_rng.pt      tp rank 00's shard: model, optimizer, iteration,
        mp_rank_01/model_optim_rng.pt      consumed samples, RNG state and the config and
                                           layout it was saved with

One file per tensor-parallel rank (Megatron's names), written by data-parallel rank 0:
the other replicas hold the same values.

A save goes to a temporary directory that is renamed into place, and the marker is replaced
atomically after it, so a crash mid-save leaves the previous checkpoint and marker intact.
Loading uses torch.load(weights_only=True): a checkpoint can hold only tensors and plain
containers, never code.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.config import Config, ConfigError

MARKER = "latest_checkpointed_iteration.txt"
FILENAME = "model_optim_rng.pt"
# Fields that fix the shapes of the weights: a checkpoint only loads into the same values.
SHAPE_FIELDS = ("family", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings")


def checkpoint_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def rank_file(root: str | Path, iteration: int) -> Path:
    """This rank's file: mp_rank_TT, or mp_rank_TT_PPP when there are pipeline stages."""
    grid = parallel_state.get_grid()
    name = f"mp_rank_{grid.tp_rank:02d}" + (f"_{grid.pp_rank:03d}" if grid.pp > 1 else "")
    return checkpoint_dir(root, iteration) / name / FILENAME


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(root: str | Path, iteration: int, consumed_samples: int, chunks: list[nn.Module],
                    optimizer: torch.optim.Optimizer, config: Config) -> Path:
    grid = parallel_state.get_grid()
    final = checkpoint_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if grid.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel_state.barrier()
    if grid.dp_rank == 0:
        path = tmp / rank_file(root, iteration).relative_to(final)
        path.parent.mkdir()
        torch.save({"iteration": iteration, "consumed_samples": consumed_samples,
                    "model": [c.state_dict() for c in chunks], "optimizer": optimizer.state_dict(),
                    "rng": _rng_state(), "config": dataclasses.asdict(config)}, path)
    parallel_state.barrier()
    if grid.rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker_tmp = Path(root) / (MARKER + ".tmp")
        marker_tmp.write_text(str(iteration))
        os.replace(marker_tmp, Path(root) / MARKER)
    parallel_state.barrier()
    return final


def latest_iteration(root: str | Path) -> int | None:
    marker = Path(root) / MARKER
    if not marker.exists():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ConfigError(f"{marker} holds {text!r}, not an iteration number")
    return int(text)


def load_checkpoint(root: str | Path, chunks: list[nn.Module], optimizer: torch.optim.Optimizer,
                    config: Config) -> tuple[int, int]:
    """Restore in place; returns (iteration, consumed_samples). (0, 0) for a directory with no checkpoint."""
    iteration = latest_iteration(root)
    if iteration is None:
        parallel_state.print_rank_0(f"WARNING: --load={root} has no {MARKER}; training starts from scratch")
        return 0, 0
    path = rank_file(root, iteration)
    if not path.exists():
        raise ConfigError(f"{path} is missing although {MARKER} names iteration {iteration}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign files surface as many exception types
        raise ConfigError(f"cannot read checkpoint {path}: {exc}") from exc
    saved = state["config"]["model"]
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size"):
        saved_value, ours = state["config"]["parallel"][name], getattr(config.parallel, name)
        if saved_value != ours:
            raise ConfigError(f"checkpoint {path} was saved with {name}={saved_value} but this run has {name}={ours}")
    for name in SHAPE_FIELDS:
        ours = getattr(config.model, name)
        if saved.get(name) != ours:
            raise ConfigError(f"checkpoint {path} has {name}={saved.get(name)} but this run has {name}={ours}")
    for chunk, chunk_state in zip(chunks, state["model"]):
        chunk.load_state_dict(chunk_state)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state["iteration"], state["consumed_samples"]
