"""pretrain_gpt.py --dry-run: the run checked whole for its world size and described by the
planner's formulas before any GPU is booked. It starts no process group, builds no model and
reads no data: only the tokenizer (for the vocabulary) and, with --load, the checkpoint's model
arguments, which decide the model's size."""
from __future__ import annotations

from megatron_lite.checkpointing import adopt_checkpoint_model_args, latest_iteration
from megatron_lite.config import Config
from megatron_lite.data import run_tokenizer
from megatron_lite.parallel_state import plan_grid
from megatron_lite.planner.hardware import gpu
from megatron_lite.planner.memory import rank_params
from megatron_lite.planner.report import describe_stage_memory, describe_step_time, describe_traffic
from megatron_lite.training.arguments import Launch
from megatron_lite.training.report import describe_layout, describe_model, describe_training


def dry_run(config: Config, launch: Launch) -> list[str]:
    """The report of a dry run: layout, model, memory per pipeline stage, traffic, the step time on
    --gpu if named, the batch. A configuration the run would refuse raises ConfigError, as it would."""
    grid = plan_grid(config.parallel, launch.world_size)
    config = config.updated(model={"vocab_size": run_tokenizer(config.train).vocab_size})
    train = config.train
    iteration = train.ckpt_step if train.ckpt_step is not None else (
        latest_iteration(train.load) if train.load else None)
    if iteration is not None:
        config = adopt_checkpoint_model_args(config, train.load, iteration)
    rank_0_params = sum(p.numel for chunk in rank_params(config, 0) for p in chunk)
    return [f"> dry run: the configuration is valid for world size {launch.world_size}; nothing was built or read",
            describe_layout(grid, config.parallel), describe_model(config, rank_0_params),
            *describe_stage_memory(config), f"> planner: {describe_traffic(config)}",
            *([describe_step_time(config, gpu(launch.gpu))] if launch.gpu else []), describe_training(config)]
