"""The learning rate of each optimizer step: linear warmup, then decay to --min-lr (Megatron's
optimizer_param_scheduler.py, the part this codebase uses).

As Megatron's, the schedule counts samples: an iteration-based run's steps are iterations times
the global batch, so the two spellings of one schedule give the same rates, and under
--rampup-batch-size the rate follows the samples actually consumed.
"""
from __future__ import annotations

import math

from megatron_lite.config.train_config import TrainConfig
from megatron_lite.optimizer.optimizer import LocalOptimizer


def schedule_steps(cfg: TrainConfig) -> tuple[int, float, int, int | None]:
    """(unit, warmup, decay, WSD anneal): the schedule's lengths in units of `unit` samples, a global
    batch for an iteration-based run (so its rates are computed from whole iterations, as they
    always were), one sample for a sample-based one."""
    if cfg.train_samples is None:
        unit, decay = cfg.global_batch_size, cfg.lr_decay_iters or cfg.train_iters
        warmup, anneal = cfg.lr_warmup_iters or 0, cfg.lr_wsd_decay_iters
    else:
        unit, decay = 1, cfg.lr_decay_samples or cfg.train_samples
        warmup, anneal = cfg.lr_warmup_samples or 0, cfg.lr_wsd_decay_samples
    if cfg.lr_warmup_fraction is not None:
        warmup = cfg.lr_warmup_fraction * decay
    return unit, warmup, decay, anneal


def _decay_coefficient(style: str, ratio: float) -> float:
    """1 at the start of a decay, 0 at its end (ratio from 0 to 1)."""
    if style == "linear":
        return 1.0 - ratio
    if style == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * ratio))
    if style == "exponential":
        return 2.0 * 0.5**ratio - 1.0
    return 1.0 - math.sqrt(ratio)  # minus_sqrt


def learning_rate(iteration: int, cfg: TrainConfig, consumed_samples: int | None = None,
                  peak: float | None = None, floor: float | None = None) -> float:
    """lr for optimizer step `iteration` (1-based), from `peak` (default --lr) to `floor` (default --min-lr).

    The schedule is read at the samples consumed through this step (default: iteration global
    batches; fewer under --rampup-batch-size): linear warmup from --lr-warmup-init reaches the peak at the
    warmup's end, the decay runs until its end and holds the floor after it.
    """
    peak = cfg.lr if peak is None else peak
    floor = cfg.min_lr if floor is None else floor
    unit, warmup, decay, anneal = schedule_steps(cfg)
    samples = iteration * cfg.global_batch_size if consumed_samples is None else consumed_samples
    steps = samples / unit  # an iteration-based run without ramp-up: exactly `iteration`
    if warmup > 0 and steps <= warmup:
        return cfg.lr_warmup_init + (peak - cfg.lr_warmup_init) * steps / warmup
    if cfg.lr_decay_style == "constant":
        return peak
    if cfg.lr_decay_style == "inverse-square-root":
        return max(floor, peak * math.sqrt(max(warmup, 1)) / math.sqrt(max(steps, 1)))
    if cfg.lr_decay_style == "WSD":
        start = decay - anneal  # stable at the peak until the last `anneal` samples of the decay
        ratio = min(max(steps - start, 0) / anneal, 1.0)
        return floor + (peak - floor) * _decay_coefficient(cfg.lr_wsd_decay_style, ratio)
    progress = min(max(steps - warmup, 0) / max(decay - warmup, 1), 1.0)
    return floor + (peak - floor) * _decay_coefficient(cfg.lr_decay_style, progress)


def set_learning_rate(optimizer: LocalOptimizer, iteration: int, cfg: TrainConfig,
                      consumed_samples: int | None = None) -> float:
    """Each param group's lr for step `iteration` (--decoupled-lr's groups carry their own peak
    and floor); returns the main groups' lr."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(iteration, cfg, consumed_samples, group.get("max_lr"), group.get("min_lr"))
    return learning_rate(iteration, cfg, consumed_samples)
