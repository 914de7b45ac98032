"""The learning rate of each optimizer step: linear warmup, then decay to --min-lr (Megatron's
optimizer_param_scheduler.py, the part this codebase uses)."""
from __future__ import annotations

import math

from megatron_lite.config.train_config import TrainConfig
from megatron_lite.optimizer.optimizer import LocalOptimizer


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


def set_learning_rate(optimizer: LocalOptimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
