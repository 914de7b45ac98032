"""AdamW with Megatron's parameter groups, the learning-rate schedule, and the plain optimizer.

Parameters and AdamW state are fp32 (under --bf16 only the compute is bf16, via autocast), so
a parameter costs 4 bytes of weight, 4 of grad and 8 of Adam moments: 16 bytes per parameter
on every data-parallel rank here, 8 + 8/dp with the distributed optimizer.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megatron_lite.config import TrainConfig


def adamw(decay: list[torch.Tensor], no_decay: list[torch.Tensor], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over two groups: weight decay for matrices, none for biases and norm weights."""
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False keeps the update a plain per-tensor loop: identical results whatever
    # the grouping or sharding of tensors, which the parity tests rely on.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             foreach=False)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state (Adam moments) held by this rank."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)


class LocalOptimizer:
    """AdamW over all of this rank's parameters; every data-parallel replica runs the same update.

    What the training loop needs of an optimizer: param_groups (for the lr), grads_for_norm()
    and norm_groups (for clipping), step(), and state_dict()/load_state_dict() for checkpoints.
    """

    norm_groups = ("mp",)  # grads are replicated over dp after the all-reduce: sum norms over tp x pp only

    def __init__(self, chunks: list[nn.Module], cfg: TrainConfig) -> None:
        self.tensors = [(p, p) for c in chunks for p in c.parameters() if p.requires_grad]
        self.optimizer = self._adamw(cfg)

    def _adamw(self, cfg: TrainConfig) -> torch.optim.AdamW:
        """AdamW over self.tensors, (optimized tensor, its parameter) pairs grouped by the parameter's rank."""
        return adamw([t for t, p in self.tensors if p.ndim > 1], [t for t, p in self.tensors if p.ndim == 1], cfg)

    def grads_for_norm(self) -> list[tuple[torch.Tensor, nn.Parameter]]:
        return [(t.grad, p) for t, p in self.tensors if t.grad is not None]

    @property
    def param_groups(self) -> list[dict]:
        # A property, not an attribute: load_state_dict replaces the inner optimizer's group dicts.
        return self.optimizer.param_groups

    def step(self) -> None:
        self.optimizer.step()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


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
