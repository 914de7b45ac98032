"""The training loop: build, step through global batches, log, evaluate, checkpoint."""
from __future__ import annotations

import contextlib
import random
import time

import numpy as np
import torch
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.checkpointing import load_checkpoint, save_checkpoint
from megatron_lite.config import Config, ConfigError
from megatron_lite.data import build_train_valid_datasets
from megatron_lite.data.loader import global_batch
from megatron_lite.data.tokenizer import ByteTokenizer
from megatron_lite.distributed.grad_clip import clip_grad_norm
from megatron_lite.distributed.grad_sync import (allreduce_data_parallel_grads, allreduce_sequence_parallel_grads,
                                                 average_across_data_parallel)
from megatron_lite.flops import flops_per_step, peak_tflops
from megatron_lite.metrics import MetricsLogger, peak_memory_gb
from megatron_lite.model.gpt import GPTModel, init_weights
from megatron_lite.optimizer import build_optimizer, learning_rate, set_learning_rate
from megatron_lite.parallel_state import print_rank_0


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_device(config: Config) -> torch.device:
    """The requested device, refusing --bf16 where the hardware has no bf16 arithmetic."""
    name = config.train.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is visible; allowed here: cpu")
    if config.train.bf16:
        ok = torch.cuda.is_bf16_supported() if name == "cuda" else torch.ops.mkldnn._is_mkldnn_bf16_supported()
        if not ok:
            raise ConfigError(f"--bf16 is not supported on this {name} (no native bf16); drop --bf16 to train in fp32")
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast (weights and optimizer stay fp32) or nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def microbatch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean loss over the unmasked tokens of one microbatch."""
    per_token = model(batch["tokens"], batch["labels"])
    mask = batch["loss_mask"]
    return (per_token * mask).sum() / mask.sum()


def forward_backward_no_pipelining(model: nn.Module, microbatches, num_microbatches: int,
                                   device: torch.device, bf16: bool) -> float:
    """Gradient accumulation: backward each microbatch's loss / num_microbatches; returns the mean loss.

    Dividing before backward makes the accumulated gradient that of the mean over the
    global batch, so k microbatches of size b give the same step as one batch of k*b.
    """
    total = 0.0
    for batch in microbatches:
        with autocast(device, bf16):
            loss = microbatch_loss(model, batch)
        (loss / num_microbatches).backward()
        total += loss.item()
    return total / num_microbatches


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, microbatches, iteration: int,
               config: Config, device: torch.device) -> tuple[float, float, float]:
    """One optimizer step; returns (loss averaged over the global batch, grad norm before clipping, lr)."""
    cfg = config.train
    optimizer.zero_grad(set_to_none=True)
    num_microbatches = cfg.num_microbatches(parallel_state.get_data_parallel_world_size())
    loss = forward_backward_no_pipelining(model, microbatches, num_microbatches, device, cfg.bf16)
    allreduce_sequence_parallel_grads(model)
    allreduce_data_parallel_grads(model)
    grad_norm = clip_grad_norm([p for p in model.parameters() if p.requires_grad], cfg.clip_grad)
    lr = learning_rate(iteration, cfg)
    set_learning_rate(optimizer, lr)
    optimizer.step()
    return average_across_data_parallel(loss), grad_norm, lr


def rank_microbatches(dataset, consumed: int, config: Config, device: torch.device):
    """This data-parallel rank's microbatches of the global batch starting at `consumed`."""
    cfg = config.train
    return global_batch(dataset, consumed, cfg.micro_batch_size, cfg.global_batch_size, device,
                        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())


@torch.no_grad()
def evaluate(model: nn.Module, dataset, config: Config, device: torch.device) -> float:
    """Mean loss over the first eval_iters global batches of the validation split (the same ones every time)."""
    cfg = config.train
    model.eval()
    losses = []
    for step in range(cfg.eval_iters):
        for batch in rank_microbatches(dataset, step * cfg.global_batch_size, config, device):
            with autocast(device, cfg.bf16):
                losses.append(microbatch_loss(model, batch).item())
    model.train()
    return average_across_data_parallel(float(np.mean(losses)))


def pretrain(config: Config) -> dict:
    """Train as configured; returns {'losses': per-step losses, 'iteration': last step, 'valid_loss': ...}."""
    cfg, par = config.train, config.parallel
    grid = parallel_state.initialize_model_parallel(par.tensor_model_parallel_size,
                                                    par.pipeline_model_parallel_size,
                                                    par.distributed_timeout_minutes)
    device = select_device(config)
    set_seed(cfg.seed)
    config.model.vocab_size = ByteTokenizer().vocab_size
    config.model.validate()
    train_ds, valid_ds, data_description = build_train_valid_datasets(cfg, config.model.seq_length)

    model = GPTModel(config.model, par.sequence_parallel)
    init_weights(model, config.model, cfg.seed)
    model.to(device)
    optimizer = build_optimizer(model, cfg)
    iteration, consumed = 0, 0
    if cfg.load:
        iteration, consumed = load_checkpoint(cfg.load, model, optimizer, config)

    logger = MetricsLogger(cfg.log_dir or cfg.save, enabled=grid.rank == 0)
    n_params = sum(p.numel() for p in model.parameters())
    print_rank_0(f"> data: {data_description}; {len(train_ds)} train samples per epoch")
    print_rank_0(f"> layout: world {grid.world_size} = tp {grid.tp} x pp {grid.pp} x dp {grid.dp}"
                 f"{', sequence parallel' if par.sequence_parallel else ''}; "
                 + "; ".join(f"{kind} groups {ranks}" for kind, ranks in grid.layout.items() if len(ranks[0]) > 1))
    print_rank_0(f"> model: {config.model.family} family, {config.model.num_layers} layers, hidden "
                 f"{config.model.hidden_size}, {n_params:,} parameters on rank 0, padded vocab "
                 f"{config.model.padded_vocab_size(grid.tp)}")
    print_rank_0(f"> training: {cfg.train_iters} iterations of global batch {cfg.global_batch_size} = micro batch "
                 f"{cfg.micro_batch_size} x {cfg.num_microbatches(grid.dp)} microbatches x dp {grid.dp}, on "
                 f"{device}{' in bf16' if cfg.bf16 else ' in fp32'}")
    if logger.path is not None:
        print_rank_0(f"> metrics: appended to {logger.path}")

    step_flops = flops_per_step(config.model, cfg.global_batch_size)
    peak = peak_tflops(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    tokens_per_step = cfg.global_batch_size * config.model.seq_length
    losses, valid_loss = [], None
    # Only train steps are timed: evaluation and checkpointing do not inflate the step time.
    interval_seconds, interval_losses, interval_norms = 0.0, [], []
    while iteration < cfg.train_iters:
        iteration += 1
        start = time.perf_counter()
        batches = rank_microbatches(train_ds, consumed, config, device)
        loss, grad_norm, lr = train_step(model, optimizer, batches, iteration, config, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        interval_seconds += time.perf_counter() - start
        consumed += cfg.global_batch_size
        losses.append(loss)
        interval_losses.append(loss)
        interval_norms.append(grad_norm)
        if iteration % cfg.log_interval == 0 or iteration == cfg.train_iters:
            seconds = interval_seconds / len(interval_losses)
            tflops = step_flops / seconds / 1e12 / grid.world_size
            logger.training({
                "iteration": iteration, "train_iters": cfg.train_iters, "consumed_samples": consumed,
                "elapsed_ms": seconds * 1e3, "lr": lr, "global_batch_size": cfg.global_batch_size,
                "lm_loss": float(np.mean(interval_losses)), "grad_norm": float(np.mean(interval_norms)),
                "tokens_per_s": tokens_per_step / seconds, "tflops_per_gpu": tflops,
                "mfu": None if peak is None else tflops / peak, "peak_memory_gb": peak_memory_gb(device)})
            interval_seconds, interval_losses, interval_norms = 0.0, [], []
        evaluate_now = cfg.eval_interval and (iteration % cfg.eval_interval == 0 or iteration == cfg.train_iters)
        if valid_ds is not None and evaluate_now:
            valid_loss = evaluate(model, valid_ds, config, device)
            logger.validation(iteration, valid_loss)
        exit_now = bool(cfg.exit_interval) and iteration % cfg.exit_interval == 0
        save_now = bool(cfg.save_interval) and iteration % cfg.save_interval == 0
        if cfg.save and (save_now or exit_now or iteration == cfg.train_iters):
            path = save_checkpoint(cfg.save, iteration, consumed, model, optimizer, config)
            print_rank_0(f"> saved checkpoint at iteration {iteration} to {path}")
        if exit_now:
            print_rank_0(f"> exiting at iteration {iteration} (--exit-interval={cfg.exit_interval})")
            break
    return {"losses": losses, "iteration": iteration, "valid_loss": valid_loss}
