"""The optional numbers of a step's log line: --log-num-zeros-in-grad (of the grads before
clipping) and --log-params-norm (of the weights after the update), as Megatron logs them."""
from __future__ import annotations

from megatron_lite.config import TrainConfig
from megatron_lite.optimizer.optimizer import LocalOptimizer


def step_statistics(optimizer: LocalOptimizer, cfg: TrainConfig, before_step: bool) -> dict:
    """The asked-for numbers known at this point of the step: before the optimizer step the grads'
    zeros, after it the weights' norm. Every rank computes them (collectives), rank 0 logs them."""
    if before_step:
        return {"num_zeros": optimizer.num_zeros_in_grad()} if cfg.log_num_zeros_in_grad else {}
    return {"params_norm": optimizer.params_norm()} if cfg.log_params_norm else {}
