"""AdamW with Megatron's parameter groups, the learning-rate schedule and grad clipping."""
from __future__ import annotations

import math

import torch
from torch import nn

from megatron_lite.config import TrainConfig


def build_optimizer(chunks: list[nn.Module], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the fp32 parameters of this rank's model chunks; biases and norm weights (the
    1-D tensors) get no weight decay."""
    decay, no_decay = [], []
    for param in (p for chunk in chunks for p in chunk.parameters()):
        if param.requires_grad:
            (no_decay if param.ndim == 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False keeps the update a plain per-tensor loop: identical results whatever
    # the grouping of tensors, which the parallel-vs-single-device parity tests rely on.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             foreach=False)


def learning_rate(iteration: int, cfg: TrainConfig) -> float:
    """lr for optimizer step `iteration` (1-based): linear warmup, then decay to min_lr.

    Warmup reaches the peak at step lr_warmup_iters; decay runs until lr_decay_iters
    (default train_iters) and holds min_lr after it.
    """
    if cfg.lr_warmup_iters > 0 and iteration <= cfg.lr_warmup_iters:
        return cfg.lr * iteration / cfg.lr_warmup_iters
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    decay_iters = cfg.lr_decay_iters or cfg.train_iters
    span = max(decay_iters - cfg.lr_warmup_iters, 1)
    progress = min(max(iteration - cfg.lr_warmup_iters, 0) / span, 1.0)
    if cfg.lr_decay_style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * coeff


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
