"""Writing a checkpoint: every rank writes its files into iter_N.tmp, then all agree, rank 0 writes
the manifest, renames the directory into place and moves the marker, in that order.

A crash or a failure at any point before the rename leaves the previous checkpoint and the
marker as they were. A failure on any rank (a full disk, a permission) is agreed on by all
ranks, which raise the same TrainingError together instead of waiting for each other.

With --async-save the files are written in the background from a copy of the state taken at
the step (so training can change the weights meanwhile): by torch.distributed.checkpoint's
async_save for torch_dist, by a thread for torch. The collective part (agreeing, manifest,
rename, marker) stays on the main thread, where collectives are issued in the same order on
every rank: when the training loop sees that every rank has written, or before the next save,
or before the run ends.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from megatron_lite import comm, parallel_state
from megatron_lite.checkpointing.manifest import file_entry, write_manifest
from megatron_lite.checkpointing.paths import MARKER, checkpoint_dir, optimizer_file, rank_file, saved_iterations
from megatron_lite.checkpointing.reshard import optimizer_checkpoint, tp_layout
from megatron_lite.checkpointing.torch_dist import common_state, copied, rng_entries, save_state, start_write
from megatron_lite.comm import all_reduce
from megatron_lite.config import Config, TrainingError
from megatron_lite.distributed.data_parallel import GRAD_GROUP
from megatron_lite.placement import gather_full, is_expert
from megatron_lite.tensor_parallel.random import get_rng_tracker


def current_layout(config: Config) -> dict:
    grid = parallel_state.get_grid()
    return {"tp": grid.size("tp"), "cp": grid.size("cp"), "pp": grid.size("pp"), "vpp": config.parallel.vpp,
            "dp": grid.size("dp"), "ep": grid.expert_parallel,
            "distributed_optimizer": config.parallel.sharded_optimizer,
            "sharding": config.parallel.sharding, "bucket_size": config.parallel.ddp_bucket_size,
            # Which layers a pp rank's chunks hold: ZB-V's V, or Megatron's interleaving.
            "pipeline_placement": "v" if config.parallel.v_shape else "interleaved"}


def rng_state() -> dict:
    """torch's generators and the model-parallel RNG's states (dropout masks continue on resume)."""
    state = {"torch": torch.get_rng_state(), "tracker": get_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _copy(obj: object) -> object:
    """The same nesting of dicts, lists and tuples with every tensor copied to host memory."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy(v) for v in obj)
    return obj


def _rank_files(tmp: Path, iteration: int, consumed_samples: int, chunks: list[nn.Module], optimizer,
                config: Config) -> list[tuple[Path, dict]]:
    """The files this rank writes and what goes in each. One model file per (tp, pp) shard, from
    the first of its dp x cp replicas (they hold the same values); with the distributed
    optimizer every replica also writes its shard of the Adam state (distrib_optim_DDD, DDD its
    index in dp x cp). optimizer=None writes weights only (`finetune`)."""
    grid = parallel_state.get_grid()
    root = tmp.parent
    path = tmp / rank_file(root, iteration).relative_to(checkpoint_dir(root, iteration))
    sharded = config.parallel.sharded_optimizer and optimizer is not None
    local = optimizer is not None and not sharded
    scaler = None if optimizer is None or optimizer.loss_scaler is None else optimizer.loss_scaler.state_dict()
    files = []
    # Collective: the distributed optimizer's main weights, experts gathered over ep.
    model = _model_state(chunks, optimizer)
    opt_state, opt_index = optimizer_checkpoint(optimizer, chunks, local) if optimizer is not None else (None, None)
    if grid.index(GRAD_GROUP) == 0:
        files.append((path, {"iteration": iteration, "consumed_samples": consumed_samples,
                             "model": model, "tp_layout": tp_layout(chunks), "loss_scaler": scaler,
                             "optimizer": opt_state if local else None, "optimizer_index": opt_index if local else None,
                             "finetune": optimizer is None, "layout": current_layout(config),
                             "rng": rng_state(), "config": dataclasses.asdict(config)}))
    if sharded:
        files.append((optimizer_file(path, grid.index(GRAD_GROUP)),
                      {"optimizer": opt_state, "optimizer_index": opt_index}))
    return files


def _model_state(chunks: list[nn.Module], optimizer) -> list[dict[str, torch.Tensor]]:
    """Each chunk's state dict with fp32 weights: under --bf16/--fp16 the optimizer's main copies,
    not the rounded model weights, so a resumed run continues exactly and an export loses nothing."""
    states = [c.state_dict() for c in chunks]
    main = optimizer.main_weights() if optimizer is not None else {}
    for chunk, state in zip(chunks, states):
        for name, p in chunk.named_parameters():
            weight = main.get(p, p).detach()
            # Experts whole, whatever the ep size: the file is the same at every ep.
            state[name] = gather_full(p, weight) if is_expert(p) else weight
    return states


class PendingSave:
    """One checkpoint on its way to disk (see the module docstring); finish() completes it.
    `write` writes this rank's files into `tmp` (or waits for them) and returns them."""

    def __init__(self, root: str | Path, iteration: int, write: Callable[[], list[Path]], tmp: Path,
                 keep_last: int | None, background: bool) -> None:
        self.root, self.iteration, self.tmp, self.keep_last = Path(root), iteration, tmp, keep_last
        self.entries: dict[str, dict[str, int]] = {}
        self.error: str | None = None
        self.thread = threading.Thread(target=self._write, args=(write,), daemon=True) if background else None
        if self.thread is None:
            self._write(write)
        else:
            self.thread.start()

    def _write(self, write: Callable[[], list[Path]]) -> None:
        try:
            for path in write():
                self.entries[path.relative_to(self.tmp).as_posix()] = file_entry(path)
        except Exception as exc:  # agreed on and raised on every rank by finish()
            self.error = f"{type(exc).__name__}: {exc}"

    def written_everywhere(self) -> bool:
        """Whether every rank has written its files; collective, never waits for a write."""
        done = torch.tensor([0.0 if self.thread is not None and self.thread.is_alive() else 1.0])
        return bool(all_reduce(done, group="world", op=torch.distributed.ReduceOp.MIN).item())

    def finish(self) -> Path:
        """Wait for this rank's files, agree, and (rank 0) write the manifest, rename, move the marker
        and prune; collective. Raises TrainingError on every rank if any rank failed."""
        if self.thread is not None:
            self.thread.join()
        results = comm.all_gather_object((self.entries, self.error))
        failures = [f"rank {r}: {error}" for r, (_, error) in enumerate(results) if error]
        if not failures:  # the same on every rank: all or none take part in this gather
            if parallel_state.get_grid().rank == 0:
                failures = self._complete({k: v for entries, _ in results for k, v in entries.items()})
            failures = comm.all_gather_object(failures)[0]
        if failures:
            if parallel_state.get_grid().rank == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise TrainingError(f"saving the checkpoint of iteration {self.iteration} to {self.root} failed "
                                f"({'; '.join(failures)}); the previous checkpoints and {MARKER} are untouched")
        return checkpoint_dir(self.root, self.iteration)

    def _complete(self, entries: dict[str, dict[str, int]]) -> list[str]:
        """Rank 0: manifest, rename into place, marker, pruning; what went wrong, if anything."""
        try:
            write_manifest(self.tmp, self.iteration, entries)
            _replace_dir(self.tmp, checkpoint_dir(self.root, self.iteration))
            marker_tmp = self.root / (MARKER + ".tmp")
            marker_tmp.write_text(str(self.iteration))
            os.replace(marker_tmp, self.root / MARKER)
        except OSError as exc:
            return [f"rank 0: {type(exc).__name__}: {exc}"]
        if self.keep_last:
            prune_checkpoints(self.root, self.keep_last)
        return []


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename tmp to final; an existing final (the same iteration saved again) is moved aside first
    and deleted only once the new one is in place."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def start_save(root: str | Path, iteration: int, consumed_samples: int, chunks: list[nn.Module], optimizer,
               config: Config, background: bool = False) -> PendingSave:
    """Begin writing iteration `iteration`'s checkpoint in --ckpt-format (in the background if `background`)."""
    tmp = checkpoint_dir(root, iteration).with_name(checkpoint_dir(root, iteration).name + ".tmp")
    if parallel_state.get_grid().rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    comm.barrier()
    if config.train.ckpt_format == "torch_dist":
        sharded = config.parallel.sharded_optimizer and optimizer is not None
        state = {**save_state(chunks, optimizer, sharded, not config.train.no_save_optim), **rng_entries(rng_state())}
        common = common_state(iteration, consumed_samples, chunks, optimizer, config, current_layout(config))
        write = start_write(tmp, copied(state) if background else state, common, config, background)
    else:
        files = _rank_files(tmp, iteration, consumed_samples, chunks, optimizer, config)
        write = functools.partial(_save_files, _copy(files) if background else files)
    return PendingSave(root, iteration, write, tmp, config.train.keep_last, background)


def _save_files(files: list[tuple[Path, dict]]) -> list[Path]:
    for path, payload in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, path)
    return [path for path, _ in files]


def save_checkpoint(root: str | Path, iteration: int, consumed_samples: int, chunks: list[nn.Module],
                    optimizer, config: Config) -> Path:
    """Write this rank's part of iter_NNNNNNN and complete it; returns its directory."""
    return start_save(root, iteration, consumed_samples, chunks, optimizer, config).finish()


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    """Delete all but the keep_last most recent iter_ directories, never the one the marker names."""
    marked = (Path(root) / MARKER).read_text().strip()
    for iteration in saved_iterations(root)[:-keep_last]:
        if str(iteration) != marked:
            shutil.rmtree(checkpoint_dir(root, iteration))


class CheckpointWriter:
    """The training loop's saves to --save: at most one in flight (--async-save writes in the background)."""

    def __init__(self, chunks: list[nn.Module], optimizer, config: Config) -> None:
        self.chunks, self.optimizer, self.config = chunks, optimizer, config
        self.pending: PendingSave | None = None

    def save(self, iteration: int, consumed_samples: int) -> None:
        self.wait()
        cfg = self.config.train
        self.pending = start_save(cfg.save, iteration, consumed_samples, self.chunks, self.optimizer, self.config,
                                  background=cfg.async_save)
        if cfg.async_save:
            parallel_state.print_rank_0(f"> saving checkpoint at iteration {iteration} in the background")
        else:
            self.wait()

    def poll(self) -> None:
        """After a step: complete a background save once every rank has written its files (collective)."""
        if self.pending is not None and self.pending.written_everywhere():
            self.wait()

    def wait(self) -> None:
        """Complete the save in flight, if any (collective)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            path = pending.finish()
            parallel_state.print_rank_0(f"> saved checkpoint at iteration {pending.iteration} to {path}")
