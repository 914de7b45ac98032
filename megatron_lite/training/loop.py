"""The training loop: build, step through global batches, log, evaluate, checkpoint."""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.checkpointing import (
    CheckpointWriter,
    adopt_checkpoint_model_args,
    latest_iteration,
    load_checkpoint,
    resolve_load,
)
from megatron_lite.comm import METER, all_reduce
from megatron_lite.config import Config, ConfigError, TrainingError
from megatron_lite.context_parallel.zigzag import split_for_context_parallel
from megatron_lite.data import build_training_data
from megatron_lite.data.documents import DocumentMasking
from megatron_lite.data.loader import PrefetchedSamples, global_batch, microbatch_indices, read_samples
from megatron_lite.distributed.grad_sync import average_across_data_parallel, reduce_partial_grads
from megatron_lite.model.moe import finish_moe_step
from megatron_lite.model.mtp import add_mtp_targets
from megatron_lite.optimizer.lr_schedule import learning_rate, set_learning_rate
from megatron_lite.parallel_state import print_rank_0
from megatron_lite.pipeline_parallel.model_runner import ModelRunner
from megatron_lite.pipeline_parallel.schedules import forward_only, run_schedule
from megatron_lite.pipeline_parallel.trace import Trace
from megatron_lite.planner.flops import flops_per_step
from megatron_lite.planner.hardware import peak_tflops
from megatron_lite.planner.report import describe_measured
from megatron_lite.tensor_parallel.random import model_parallel_seed
from megatron_lite.training.exit_conditions import ExitConditions
from megatron_lite.training.metric_writers import open_writers
from megatron_lite.training.metrics import MetricsLogger, peak_memory_gb
from megatron_lite.training.parallelize import TrainingModel, parallelize
from megatron_lite.training.report import print_run
from megatron_lite.training.step_statistics import step_statistics
from megatron_lite.training.step_timers import StepTimers, timed


def set_seed(seed: int, device: torch.device = torch.device("cpu")) -> None:
    """Python's and numpy's generators, and torch's with the model-parallel RNG on `device`
    (tensor_parallel/random.py); after the grid exists, whose pp and tp ranks the seeds take."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    model_parallel_seed(seed, device)


def select_device(config: Config) -> torch.device:
    """The requested device, refusing --bf16 on a GPU without bf16 arithmetic. A CPU without it
    (no AVX-512 BF16 or AMX) still runs bf16, emulated: correct, so the bf16 path can be checked
    anywhere, but many times slower than fp32, which the start-up log says."""
    name = config.train.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is visible; allowed here: cpu")
    if config.train.bf16 and name == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--bf16 is not supported on this GPU (no native bf16); drop --bf16 to train in fp32")
    if config.train.bf16 and name == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print_rank_0("note: this cpu has no native bf16 arithmetic: --bf16 runs emulated, correct but many times "
                     "slower than fp32")
    if config.train.fp16 and name == "cuda" and torch.cuda.get_device_capability()[0] < 6:
        raise ConfigError("--fp16 needs a GPU of compute capability 6.0 or newer; drop --fp16 to train in fp32")
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")


def last_stage_loss(losses: list[torch.Tensor], shape: tuple[int, ...] = ()) -> float | list[float]:
    """Mean microbatch loss of the step, known on the last pipeline stage, on every rank; of each
    entry of losses of `shape` (the MTP modules' [N]), a list."""
    grid = parallel_state.get_grid()
    mean = (torch.stack(losses).double().mean(0) if losses
            else torch.zeros(shape, dtype=torch.float64, device=_reduce_device()))
    if grid.size("pp") > 1:
        all_reduce(mean.view(-1), group="pp")
    if shape:
        return [average_across_data_parallel(value) for value in mean.tolist()]
    return average_across_data_parallel(mean.item())


def _reduce_device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def microbatch_shape(config: Config) -> tuple[int, int, int]:
    """Shape of the hidden states passed between pipeline stages: [micro batch, this rank's tokens
    (seq / cp, and / tp under SP), hidden]; the sizes from the rank grid, as every layer reads them."""
    grid = parallel_state.get_grid()
    seq = config.model.seq_length // grid.size("cp")
    return (config.train.micro_batch_size, seq // grid.size("tp") if config.parallel.sequence_parallel else seq,
            config.model.hidden_size)


def forward_backward(model: TrainingModel, microbatches, config: Config, device: torch.device,
                     trace: Trace | None = None, loss_scale: float = 1.0,
                     global_batch_size: int | None = None) -> ModelRunner:
    """Forward and backward of the step's microbatches under the pipeline schedule, then every grad
    reduction; returns the runner, which holds the last stage's microbatch losses (none on other stages).

    Afterwards each rank holds, in each parameter's fp32 main_grad (with the distributed
    optimizer: in its shard of the grad buffer), `loss_scale` times the gradient of the mean
    loss over the global batch, not yet clipped. `global_batch_size`: this step's, under
    --rampup-batch-size (default: --global-batch-size).
    """
    cfg, par = config.train, config.parallel
    for buf in model.grad_buffers:
        buf.zero_grad()
    num_microbatches = cfg.num_microbatches(parallel_state.get_grid().size("dp"), global_batch_size)
    runner = ModelRunner(model.chunks, list(microbatches), num_microbatches, microbatch_shape(config), device,
                         cfg.params_dtype, trace, loss_scale=loss_scale,
                         before_last_backward=lambda c: [b.start_grad_sync_on_backward() for b in model.buffers_of(c)],
                         after_backward=lambda c: [b.finish_microbatch() for b in model.buffers_of(c)],
                         per_token_loss=cfg.calculate_per_token_loss)
    run_schedule(runner, par.schedule, num_microbatches, par.vpp, microbatch_group_size=par.microbatch_group_size)
    # Partial grads summed first, then the data-parallel reduction of their (deferred) buckets.
    reduce_partial_grads(model.chunks)
    for buf in model.grad_buffers:
        buf.finish_grad_sync()
    return runner


class StepResult(NamedTuple):
    loss: float  # averaged over the global batch
    grad_norm: float  # before clipping (inf or nan on a step --fp16 skipped)
    lr: float
    skipped: bool  # --fp16: the gradients overflowed, the weights were left as they were
    moe: dict | None = None  # mixture of experts: the step's balancing loss and expert load (model/moe.py)
    mtp: list[float] | None = None  # multi-token prediction: each module's loss, averaged as loss is
    stats: dict | None = None  # --log-params-norm's and --log-num-zeros-in-grad's numbers (step_statistics)


def train_step(model: TrainingModel, microbatches, iteration: int, config: Config, device: torch.device,
               trace: Trace | None = None, inspect_grads: Callable[[TrainingModel], None] | None = None,
               consumed_samples: int | None = None, global_batch_size: int | None = None,
               timers: StepTimers | None = None) -> StepResult:
    """One optimizer step.

    `inspect_grads(model)`, if given, runs once the grads are reduced and before they are clipped
    (the parity tests compare them there with one device's). `consumed_samples`: the samples read
    through this step, for the lr schedule, and `global_batch_size` this step's batch (both
    default to a constant --global-batch-size). `timers`: the forward-backward and optimizer phases are
    timed into it (--log-timers-to-tensorboard).
    """
    cfg, scaler = config.train, model.optimizer.loss_scaler
    with timed(timers, "forward-backward"):
        runner = forward_backward(model, microbatches, config, device, trace,
                                  1.0 if scaler is None else scaler.scale, global_batch_size)
    if scaler is not None:
        for buf in model.grad_buffers:
            buf.grad_data.mul_(1.0 / scaler.scale)
    if inspect_grads is not None:
        inspect_grads(model)
    loss = last_stage_loss(runner.losses)
    depths = config.model.mtp_depths
    mtp = last_stage_loss(runner.mtp_losses, (depths,)) if depths else None
    moe = finish_moe_step(model.chunks) if config.model.num_experts else None
    stats = step_statistics(model.optimizer, cfg, before_step=True)
    with timed(timers, "optimizer"):
        grad_norm = model.optimizer.clip_grads(cfg.clip_grad)
        # The norm is summed over every rank's grads, so every rank sees the same overflow verdict.
        skipped = scaler is not None and not math.isfinite(grad_norm)
        if scaler is not None:
            scaler.update(found_inf=skipped)
        if cfg.check_for_nan_in_loss_and_grad:
            check_finite(iteration, loss, 0.0 if skipped else grad_norm)
        lr = learning_rate(iteration, cfg, consumed_samples)
        if not skipped:
            set_learning_rate(model.optimizer, iteration, cfg, consumed_samples)
            model.optimizer.step()
    stats.update(step_statistics(model.optimizer, cfg, before_step=False))
    return StepResult(loss, grad_norm, lr, skipped, moe, mtp, stats or None)


def check_finite(iteration: int, loss: float, grad_norm: float) -> None:
    """Stop before the optimizer step applies a non-finite loss or gradient.

    Both numbers come out of all-reduces, so every rank holds the same values and stops at
    the same step: the decision needs no collective of its own and no rank is left waiting.
    """
    bad = [f"{name} is {value}" for name, value in (("lm loss", loss), ("grad norm", grad_norm))
           if not math.isfinite(value)]
    if bad:
        raise TrainingError(f"iteration {iteration}: {' and '.join(bad)}; stopped before the optimizer step "
                            "(--no-check-for-nan-in-loss-and-grad lets a run go on)")


def rank_microbatches(dataset, consumed: int, config: Config, device: torch.device,
                      documents: DocumentMasking | None = None, global_batch_size: int | None = None,
                      read=read_samples):
    """This rank's microbatches of the global batch starting at `consumed` (of `global_batch_size`
    samples, default --global-batch-size): its data-parallel replica's samples (with `documents`'
    masks), and of each sample the tokens its context-parallel rank holds (with multi-token
    prediction, what its modules read and predict, cut from the whole sequences first). `read`: how
    samples are read (read_samples, or the training run's PrefetchedSamples)."""
    cfg, grid, depths = config.train, parallel_state.get_grid(), config.model.mtp_depths
    batches = global_batch(dataset, consumed, cfg.micro_batch_size, global_batch_size or cfg.global_batch_size,
                           device, grid.coord("dp"), grid.size("dp"), documents, read)
    return (split_for_context_parallel(add_mtp_targets(batch, depths) if depths else batch) for batch in batches)


def sample_reader(dataset, consumed: int, iteration: int, config: Config):
    """How the training loop from `iteration` steps done and `consumed` samples read reads its samples: in process,
    or with --num-workers by worker processes, in the order of this rank's microbatches of every step to come."""
    cfg, grid = config.train, parallel_state.get_grid()
    if not cfg.num_workers:
        return read_samples

    def schedule() -> Iterator[list[int]]:
        samples = consumed
        for _ in range(iteration, cfg.train_iters):
            size = cfg.batch_size_at(samples)
            yield from microbatch_indices(samples, cfg.micro_batch_size, size, grid.coord("dp"), grid.size("dp"))
            samples += size

    return PrefetchedSamples(dataset, schedule(), cfg.num_workers)


def document_keys(batches: list[dict[str, torch.Tensor]]) -> float | None:
    """The mean keys per query of document-masked attention over this rank's microbatches (its
    data-parallel share stands for the global batch in the FLOPs count); None without documents."""
    keys = [batch["document_keys"] for batch in batches if "document_keys" in batch]
    return float(torch.cat(keys).mean()) if keys else None


@torch.no_grad()
def evaluate(chunks: list[nn.Module], dataset, config: Config, device: torch.device,
             documents: DocumentMasking | None = None) -> float:
    """Mean loss over the first eval_iters global batches of the validation split (the same ones every time)."""
    cfg = config.train
    for chunk in chunks:
        chunk.eval()
    losses = []
    for step in range(cfg.eval_iters):
        batches = list(rank_microbatches(dataset, step * cfg.global_batch_size, config, device, documents))
        runner = ModelRunner(chunks, batches, len(batches), microbatch_shape(config), device, cfg.params_dtype,
                             per_token_loss=cfg.calculate_per_token_loss)
        forward_only(runner, len(batches), config.parallel.vpp)
        losses.extend(runner.losses)
    for chunk in chunks:
        chunk.train()
    return last_stage_loss(losses)


def pretrain(config: Config) -> dict:
    """Train as configured; returns {'losses': per-step losses, 'iteration': last step, 'valid_loss': ...,
    'config': the Config it trained with (the vocabulary and checkpoint's model arguments adopted)}."""
    cfg, par = config.train, config.parallel
    grid = parallel_state.initialize_model_parallel(par)
    device = select_device(config)
    set_seed(cfg.seed, device)
    data = build_training_data(cfg, config.model.seq_length)
    tokenizer, train_ds, valid_ds, data_description = data.tokenizer, data.train, data.valid, data.description
    config = config.updated(model={"vocab_size": tokenizer.vocab_size})
    load_iteration = resolve_load(cfg.load, cfg.ckpt_step) if cfg.load else None
    if load_iteration is not None:
        config = adopt_checkpoint_model_args(config, cfg.load, load_iteration)

    model = parallelize(config, device)
    iteration, consumed = 0, 0
    if load_iteration is not None:
        iteration, consumed = load_checkpoint(cfg.load, model.chunks, model.optimizer, config, load_iteration)

    logger = MetricsLogger(cfg.log_dir or cfg.save, enabled=grid.rank == 0,
                           writers=open_writers(config) if grid.rank == 0 else (),
                           writer_interval=cfg.tensorboard_log_interval, log_throughput=cfg.log_throughput)
    print_rank_0(f"> data: {data_description}")
    print_run(config, model, grid, device)
    for destination in logger.destinations():
        print_rank_0(f"> metrics: {destination}")
    writer = CheckpointWriter(model.chunks, model.optimizer, config) if cfg.save else None
    exits = ExitConditions(cfg, _reduce_device())
    try:
        return _train(config, model, train_ds, valid_ds, iteration, consumed, logger, writer, exits, device,
                      data.documents)
    except TrainingError as exc:
        if writer is not None:
            writer.wait()  # a background save of an earlier, good step still completes
        kept = latest_iteration(cfg.save) if cfg.save else None
        raise TrainingError(f"{exc}; " + (f"the latest checkpoint in {cfg.save} is iteration {kept}" if kept else
                                          "no checkpoint was saved")) from exc
    finally:
        exits.close()
        logger.close()  # flushes TensorBoard / wandb, also when training failed


def _train(config: Config, model: TrainingModel, train_ds, valid_ds, iteration: int, consumed: int,
           logger: MetricsLogger, writer: CheckpointWriter | None, exits: ExitConditions,
           device: torch.device, documents: DocumentMasking | None = None) -> dict:
    """The loop of pretrain, from `iteration` steps done and `consumed` samples read."""
    cfg = config.train
    world = parallel_state.get_grid().world_size
    read = sample_reader(train_ds, consumed, iteration, config)
    timers = StepTimers(device) if cfg.log_timers_to_tensorboard else None
    peak = peak_tflops(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    losses, valid_loss = [], None
    # Only train steps are timed: evaluation and checkpointing do not inflate the step time.
    interval_seconds, interval_flops, skipped = 0.0, 0.0, 0
    interval_losses, interval_mtp, interval_norms = [], [], []
    while iteration < cfg.train_iters:
        iteration += 1
        start = time.perf_counter()
        batch_size = cfg.batch_size_at(consumed)  # --rampup-batch-size's, else --global-batch-size
        with timed(timers, "batch-generator"):
            batches = list(rank_microbatches(train_ds, consumed, config, device, documents, batch_size, read))
        keys = document_keys(batches)
        interval_flops += flops_per_step(config.model, batch_size, keys)
        METER.reset()  # what the meter holds after the loop is the last step's traffic
        loss, grad_norm, lr, step_skipped, moe, mtp, stats = train_step(model, batches, iteration, config, device,
                                                                        consumed_samples=consumed + batch_size,
                                                                        global_batch_size=batch_size, timers=timers)
        last_traffic = dict(METER.bytes)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        interval_seconds += time.perf_counter() - start
        consumed += batch_size
        losses.append(loss)
        interval_losses.append(loss)
        if mtp is not None:
            interval_mtp.append(mtp)
        if step_skipped:  # its grad norm is not finite: not averaged into the logged one
            skipped += 1
        else:
            interval_norms.append(grad_norm)
        if iteration % cfg.log_interval == 0 or iteration == cfg.train_iters:
            seconds = interval_seconds / len(interval_losses)
            tflops = interval_flops / len(interval_losses) / seconds / 1e12 / world
            logger.training({
                "iteration": iteration, "train_iters": cfg.train_iters, "consumed_samples": consumed,
                "elapsed_ms": seconds * 1e3, "lr": lr, "global_batch_size": batch_size,
                "lm_loss": float(np.mean(interval_losses)),
                "loss_scale": 1.0 if model.optimizer.loss_scaler is None else model.optimizer.loss_scaler.scale,
                "grad_norm": float(np.mean(interval_norms)) if interval_norms else math.nan,
                "skipped_iterations": skipped, **(moe or {}), **(stats or {}),
                **({"mtp_losses": np.mean(interval_mtp, axis=0).tolist()} if interval_mtp else {}),
                "tokens_per_s": batch_size * config.model.seq_length / seconds, "tflops_per_gpu": tflops,
                "mfu": None if peak is None else tflops / peak, "peak_memory_gb": peak_memory_gb(device),
                **({} if timers is None else {"timers": timers.per_step(len(interval_losses))})})
            interval_seconds, interval_flops, skipped = 0.0, 0.0, 0
            interval_losses, interval_mtp, interval_norms = [], [], []
        evaluate_now = cfg.eval_interval and (iteration % cfg.eval_interval == 0 or iteration == cfg.train_iters)
        if valid_ds is not None and evaluate_now:
            valid_loss = evaluate(model.chunks, valid_ds, config, device, documents)
            logger.validation(iteration, valid_loss)
        stop = exits.check()
        if bool(cfg.exit_interval) and iteration % cfg.exit_interval == 0:
            stop = f"--exit-interval={cfg.exit_interval}"
        save_now = bool(cfg.save_interval) and iteration % cfg.save_interval == 0
        if writer is not None:
            if stop or save_now or iteration == cfg.train_iters:
                writer.save(iteration, consumed)
            else:
                writer.poll()
        if stop:
            print_rank_0(f"> exiting at iteration {iteration}: {stop}"
                         + ("" if writer else " (no --save: nothing saved)"))
            break
    if writer is not None:
        writer.wait()
    model.optimizer.finish_param_gather()
    if losses:
        print_rank_0(describe_measured(config, last_traffic))
    return {"losses": losses, "iteration": iteration, "valid_loss": valid_loss, "config": config}
