"""Reading a checkpoint: which iteration, verified before anything is used, the model arguments it
was saved with, and the weights, Adam state and RNG state, resharded when the layout differs."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.checkpointing.manifest import damaged_files
from megatron_lite.checkpointing.paths import (
    MARKER,
    checkpoint_dir,
    first_file,
    latest_iteration,
    optimizer_file,
    rank_file,
    saved_iterations,
    shard_file,
)
from megatron_lite.checkpointing.reshard import FullState, LegacyTensors, load_full_state, read_legacy_state
from megatron_lite.checkpointing.save import current_layout
from megatron_lite.checkpointing.torch_dist import (
    COMMON,
    SavedTensors,
    is_torch_dist,
    load_into,
    read_full,
    split_dims,
)
from megatron_lite.config import Config, ConfigError, ModelConfig, ParallelConfig, TrainConfig
from megatron_lite.config.layout import Layout
from megatron_lite.distributed.data_parallel import GRAD_GROUP
from megatron_lite.tensor_parallel.random import get_rng_tracker


def saved_config(config: dict) -> Config:
    """The Config a checkpoint was saved with, from its "config" entry."""
    return Config(model=ModelConfig(**config["model"]), parallel=ParallelConfig(**config["parallel"]),
                  train=TrainConfig(**config["train"]))


def load_file(path: Path, mmap: bool = False) -> dict:
    """A torch.save file of a checkpoint; with `mmap`, its tensors are read only where touched."""
    if not path.exists():
        raise ConfigError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated or foreign files surface as many exception types
        raise ConfigError(f"cannot read checkpoint {path}: {exc}") from exc


def resolve_load(root: str | Path, ckpt_step: int | None = None) -> int | None:
    """The iteration to resume from (`ckpt_step`, else the marker's), its files checked against its
    manifest; None when root holds no checkpoint yet (training starts from scratch). Collective."""
    if ckpt_step is None:
        iteration = latest_iteration(root)
        if iteration is None:
            state = "does not exist yet" if not Path(root).exists() else f"has no {MARKER}"
            parallel_state.print_rank_0(f"WARNING: --load={root} {state}; training starts from scratch")
            return None
    else:
        iteration = ckpt_step
        if not checkpoint_dir(root, iteration).is_dir():
            raise ConfigError(f"--ckpt-step={ckpt_step}: {checkpoint_dir(root, iteration)} does not exist; {root} "
                              f"holds iterations {saved_iterations(root) or 'none'}")
    verify_checkpoint(root, iteration)
    return iteration


def verify_checkpoint(root: str | Path, iteration: int) -> None:
    """Refuse a checkpoint whose files do not match its manifest, naming them and the newest intact
    checkpoint before it (which --ckpt-step selects). Collective."""
    where = checkpoint_dir(root, iteration)
    problems = damaged_files(where)
    if problems is None:
        parallel_state.print_rank_0(f"WARNING: {where} has no manifest (saved by an older version): its files "
                                    "are not verified")
    elif problems:
        older = [i for i in reversed(saved_iterations(root)) if i < iteration]
        intact = next((i for i in older if not damaged_files(checkpoint_dir(root, i))), None)
        hint = (f"the newest intact checkpoint is iteration {intact}: resume from it with --ckpt-step {intact}"
                if intact is not None else f"{root} holds no intact checkpoint before it")
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"checkpoint {where} is damaged: {problems[0]}{more}; {hint}")


def check_model_args(config: Config, saved: dict, where: Path, adopt: bool = False) -> dict[str, object]:
    """Compare every ModelConfig field but the training-only ones with the checkpoint's (`saved`, its
    model config). A field the user set that differs is refused, naming it and both values; with
    `adopt`, one the user left unset takes the checkpoint's value, and so does a vocabulary table
    larger than the tokenizer. Returns {field: the checkpoint's value} of what is to be adopted."""
    given = config.model_flags_given
    adopted = {}
    for field in dataclasses.fields(ModelConfig):
        name = field.name
        if name in ModelConfig.TRAINING_ONLY or name not in saved or saved[name] == getattr(config.model, name):
            continue
        ours, theirs, flag = getattr(config.model, name), saved[name], "--" + name.replace("_", "-")
        if name == "vocab_size":
            if theirs < ours:
                raise ConfigError(f"checkpoint {where} has a vocabulary of {theirs} tokens but this run's tokenizer "
                                  f"({config.train.tokenizer_type}) has {ours}; use the tokenizer it was trained with")
            # Released models pad their table past their tokenizer (Qwen2.5: 151936 rows, 151665
            # tokens): every id the tokenizer emits has its row, and the rows beyond stay in the
            # softmax as the original model has them.
            adopted[name] = theirs
            continue
        if not adopt or given is None or name in given:
            raise ConfigError(f"{flag}={ours} contradicts checkpoint {where}, saved with {flag}={theirs}; "
                              f"leave {flag} out to continue with the checkpoint's value")
        adopted[name] = theirs
    return adopted


def _check_built_with(config: Config, saved: dict, where: Path) -> None:
    """The model is built: its arguments must be the checkpoint's already (adopt_checkpoint_model_args
    took what differed before it was built)."""
    pending = check_model_args(config, saved, where)
    if pending:
        name, value = next(iter(pending.items()))
        raise ConfigError(f"checkpoint {where} has --{name.replace('_', '-')}={value} but the model was built with "
                          f"{getattr(config.model, name)}; adopt the checkpoint's model arguments before building it")


def _check_optimizer(config: Config, saved: dict, where: Path) -> None:
    """Optimizer state loads into the optimizer that wrote it (AdamW's moments are not Muon's momentum)."""
    optimizer = saved.get("train", {}).get("optimizer", "adam")  # checkpoints from before --optimizer: AdamW
    if optimizer != config.train.optimizer:
        raise ConfigError(f"checkpoint {where} holds --optimizer {optimizer} state but this run has --optimizer "
                          f"{config.train.optimizer}; resume with --optimizer {optimizer}")


def adopt_checkpoint_model_args(config: Config, root: str | Path, iteration: int) -> Config:
    """Before the model is built: take from the checkpoint the model arguments the user left unset
    (Megatron's --use-checkpoint-args), refuse contradicting ones; the result is a new Config,
    validated whole (an adopted --num-experts meets the parallel checks it would have met as a flag)."""
    where = checkpoint_dir(root, iteration)
    adopted = check_model_args(config, read_common(root, iteration)["config"]["model"], where, adopt=True)
    if adopted:
        told = [f"vocab size {value} (the tokenizer has {config.model.vocab_size} tokens)" if name == "vocab_size"
                else f"--{name.replace('_', '-')}={value}" for name, value in adopted.items()]
        parallel_state.print_rank_0(f"> model arguments from checkpoint {where}: {', '.join(told)}")
    return config.updated(model=adopted)


def read_common(root: str | Path, iteration: int) -> dict:
    """What a checkpoint records besides tensors (iteration, config, layout...): torch_dist's
    common.pt, or the torch format's first model file (its tensors mapped, not read)."""
    where = checkpoint_dir(root, iteration)
    if is_torch_dist(where):
        return load_file(where / COMMON)
    return load_file(first_file(root, iteration), mmap=True)


def read_checkpoint(root: str | Path, iteration: int) -> FullState:
    """A saved checkpoint, whatever its layout and format, as full tensors (the torch format's read
    one parameter at a time, when asked for)."""
    if is_torch_dist(checkpoint_dir(root, iteration)):
        return read_full(checkpoint_dir(root, iteration), load_file)
    layout = read_common(root, iteration)["layout"]
    files = {}
    for (tp_rank, pp_rank), model_file in _model_files(root, iteration, layout).items():
        dp_files = ([optimizer_file(model_file, d) for d in range(layout["dp"] * layout.get("cp", 1))]
                    if layout["distributed_optimizer"] else [])
        files[(tp_rank, pp_rank)] = [model_file, *dp_files]
    return read_legacy_state(files, load_file)


def _model_files(root: str | Path, iteration: int, layout: dict) -> dict[tuple[int, int], Path]:
    """The torch format's model file of each (tp, pp) shard."""
    return {(t, p): shard_file(root, iteration, t, p, layout["pp"]) for t in range(layout["tp"])
            for p in range(layout["pp"])}


def saved_weights(root: str | Path, iteration: int) -> Mapping[str, torch.Tensor]:
    """A saved checkpoint's full weights by name, of any layout and format, each read only when asked
    for (what an export streams: one tensor in memory at a time)."""
    common, where = read_common(root, iteration), checkpoint_dir(root, iteration)
    if is_torch_dist(where):
        return SavedTensors(where, split_dims(common))
    return LegacyTensors(_model_files(root, iteration, common["layout"]), load_file)


def _same_layout(saved: dict, ours: dict) -> bool:
    if saved.get("ep", 1) > 1 or ours["ep"] > 1:
        return False  # files hold experts whole and their Adam state as full ranges: always resharded
    if ours["sharding"] == "optim_grads_params":
        return False  # the parameters are sharded: their shards come from full tensors
    # dp, and the buckets the strategy and size cut, decide which file holds what only when the
    # Adam state is sharded over dp. Checkpoints from before cp, or before ZeRO-2/3, lack the key.
    keys = ["tp", "pp", "vpp", "distributed_optimizer"] + (["dp", "cp"] if ours["distributed_optimizer"] else [])
    saved_sharding = saved.get("sharding", "optim" if saved["distributed_optimizer"] else "no_shard")
    same_placement = saved.get("pipeline_placement", "interleaved") == ours["pipeline_placement"]
    return (all(saved.get(k, 1) == ours[k] for k in keys) and saved_sharding == ours["sharding"] and same_placement
            and (not ours["distributed_optimizer"]
                 or saved.get("bucket_size", ours["bucket_size"]) == ours["bucket_size"]))


def load_checkpoint(root: str | Path, chunks: list[nn.Module], optimizer, config: Config,
                    iteration: int | None = None) -> tuple[int, int]:
    """Restore in place from `iteration` (default: the marker's, verified); returns (iteration,
    consumed_samples). (0, 0) for a directory with no checkpoint or a weights-only one. The model
    arguments must match the checkpoint's."""
    if iteration is None:
        iteration = resolve_load(root)
        if iteration is None:
            return 0, 0
    if is_torch_dist(checkpoint_dir(root, iteration)):
        return _load_torch_dist(root, iteration, chunks, optimizer, config)
    path = rank_file(root, iteration)
    # Mapped: when the layouts differ this file is only looked at, and reading it whole would cost
    # rank 0 (whose file name a tp 1 checkpoint also has) the saved model and its Adam state.
    state = load_file(path, mmap=True) if path.exists() else None
    cfg = config.train
    if (state is None or state["finetune"] or cfg.finetune or cfg.no_load_optim
            or not _same_layout(state["layout"], current_layout(config))):
        return _load_resharded(root, iteration, chunks, optimizer, config)
    state = load_file(path)  # read, not mapped: mapped pages read once more would count twice until freed
    _check_built_with(config, state["config"]["model"], path)
    _check_optimizer(config, state["config"], path)
    for chunk, chunk_state in zip(chunks, state["model"]):
        chunk.load_state_dict(chunk_state)
    # The files hold fp32 weights; under --bf16 the model's are rounded, the main copies are not.
    optimizer.load_main_weights({p: chunk_state[name] for chunk, chunk_state in zip(chunks, state["model"])
                                 for name, p in chunk.named_parameters()})
    if config.parallel.sharded_optimizer:
        shard = parallel_state.get_grid().index(GRAD_GROUP)
        optimizer.load_state_dict(load_file(optimizer_file(path, shard))["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    _load_loss_scaler(optimizer, state.get("loss_scaler"))
    if not cfg.no_load_rng:
        _set_rng_state(state["rng"])
    return state["iteration"], state["consumed_samples"]


def _load_loss_scaler(optimizer, saved: dict | None) -> None:
    """The --fp16 loss scale goes on from where it was; a checkpoint without one (saved in bf16 or
    fp32) leaves the scaler at --initial-loss-scale."""
    if optimizer.loss_scaler is not None and saved is not None:
        optimizer.loss_scaler.load_state_dict(saved)


def _load_resharded(root: str | Path, iteration: int, chunks: list[nn.Module], optimizer,
                    config: Config) -> tuple[int, int]:
    """Load through full tensors: another layout, or weights only (saved so, or --finetune and
    --no-load-optim: weights and main weights, a fresh optimizer; --finetune from iteration 0)."""
    where, cfg = checkpoint_dir(root, iteration), config.train
    full = read_checkpoint(root, iteration)
    _check_built_with(config, full.config["model"], where)
    from_start, fresh_optimizer = _announce(where, full.iteration, full.config, full.layout, config,
                                            full.optimizer is None)
    if fresh_optimizer:
        full = dataclasses.replace(full, optimizer=None)
    load_full_state(full, chunks, optimizer)
    if from_start:
        return 0, 0
    if not fresh_optimizer:
        _load_loss_scaler(optimizer, full.loss_scaler)
    if not cfg.no_load_rng:
        _set_rng_state(full.rng[_rng_position(full.layout)])
    return full.iteration, full.consumed_samples


def _announce(where: Path, iteration: int, saved_config: dict, saved_layout: dict, config: Config,
              weights_only: bool) -> tuple[bool, bool]:
    """Say what is loaded from `where` (saved at `iteration`) and how, checking that optimizer state goes into the
    optimizer that wrote it; returns (training starts at iteration 0: a weights-only checkpoint or
    --finetune; the optimizer starts fresh: that or --no-load-optim)."""
    cfg = config.train
    from_start = weights_only or cfg.finetune
    if from_start:
        parallel_state.print_rank_0(f"> loading weights only from {where} "
                                    f"({'--finetune' if cfg.finetune else 'no optimizer state'}): training starts "
                                    "at iteration 0 with a fresh optimizer")
    elif cfg.no_load_optim:
        parallel_state.print_rank_0(f"> loading weights from {where} (--no-load-optim): iteration {iteration} "
                                    "with a fresh optimizer")
    else:
        _check_optimizer(config, saved_config, where)
        saved, current = Layout.from_checkpoint(saved_layout).name, Layout.of(config.parallel).name
        if saved != current:
            parallel_state.print_rank_0(f"> resharding checkpoint {where} saved with {saved} to {current}")
    return from_start, from_start or cfg.no_load_optim


def _load_torch_dist(root: str | Path, iteration: int, chunks: list[nn.Module], optimizer,
                     config: Config) -> tuple[int, int]:
    """Each rank reads its own pieces, at the saved layout or any other (torch_dist.py)."""
    where, cfg = checkpoint_dir(root, iteration), config.train
    common = load_file(where / COMMON)
    _check_built_with(config, common["config"]["model"], where)
    if not common.get("optimizer_state", True) and not (common["finetune"] or cfg.no_load_optim or cfg.finetune):
        raise ConfigError(f"{where} was saved with --no-save-optim: it holds no optimizer state; resume from it with "
                          f"--no-load-optim (iteration {common['iteration']}, a fresh optimizer) or --finetune")
    from_start, fresh_optimizer = _announce(where, common["iteration"], common["config"], common["layout"], config,
                                            common["finetune"])
    rng_at = None if from_start or cfg.no_load_rng else _rng_position(common["layout"])
    rng = load_into(where, chunks, optimizer, config, not fresh_optimizer, rng_at)
    if from_start:
        return 0, 0
    if not fresh_optimizer:
        _load_loss_scaler(optimizer, common["loss_scaler"])
    if rng is not None:
        _set_rng_state(rng)
    return common["iteration"], common["consumed_samples"]


def _rng_position(saved_layout: dict) -> tuple[int, int]:
    """Whose RNG states this rank continues with: its own where the saved layout has its (tp, pp)
    position, else the first rank's (a new layout draws new masks anyway)."""
    grid = parallel_state.get_grid()
    same = (saved_layout["tp"], saved_layout["pp"]) == (grid.size("tp"), grid.size("pp"))
    return (grid.coord("tp"), grid.coord("pp")) if same else (0, 0)


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    if "tracker" in rng:  # checkpoints from before the model-parallel RNG have none
        get_rng_tracker().set_states(rng["tracker"])
