"""The run's start-up report (layout, model, memory by formula and as allocated, the planner's
prediction) and the memory parts the closing "measured" line compares with the planner."""
from __future__ import annotations

import dataclasses

import torch

from megatron_lite import parallel_state
from megatron_lite.config import Config, ParallelConfig
from megatron_lite.config.layout import Layout
from megatron_lite.distributed.distributed_optimizer import DistributedOptimizer
from megatron_lite.distributed.parameter_server import ParameterServerOptimizer
from megatron_lite.optimizer.muon import Muon, uses_muon
from megatron_lite.optimizer.optimizer import state_bytes_per_element
from megatron_lite.parallel_state import print_rank_0
from megatron_lite.planner.activation_memory import describe_activation_memory
from megatron_lite.planner.flops import flops_per_step, newton_schulz_flops
from megatron_lite.planner.report import describe_plan
from megatron_lite.training.parallelize import TrainingModel


def describe_layout(grid: parallel_state.Grid, par: ParallelConfig) -> str:
    """One line: the layout's name, the world, the schedule, and the global ranks of each group of
    more than one rank."""
    extras = []
    if grid.expert_parallel > 1:
        extras.append(f", experts over ep {grid.expert_parallel} x edp {grid.size('edp')}")
    if grid.size("pp") > 1:
        extras.append(f", {par.schedule} schedule" + (f" over {par.vpp} chunks per rank" if par.vpp > 1 else ""))
    shown = set()
    for name in parallel_state.group_names(grid):
        ranks = grid.ranks(name)
        if len(ranks[0]) > 1 and str(ranks) not in shown:
            shown.add(str(ranks))
            extras.append(f"; {name} groups {ranks}")
    name = dataclasses.replace(Layout.of(par), dp=grid.size("dp")).name  # dp: what the world leaves
    return f"> layout: {name} on world {grid.world_size}{''.join(extras)}"


def memory_parts(model: TrainingModel) -> dict[str, int]:
    """This rank's bytes of weights (the distributed optimizer's flat buffers: under ZeRO-3 the
    shards), fp32 grads (the grad buffers: under ZeRO-2/3 the shards), fp32 main weights and
    optimizer state (Adam moments; Muon's momentum buffers), as allocated."""
    optimized = model.optimizer.tensors
    muon = isinstance(model.optimizer.optimizer, Muon)
    if isinstance(model.optimizer, DistributedOptimizer):
        weights = sum(buf.param_data.numel() * buf.param_data.element_size() for buf in model.grad_buffers)
    else:
        weights = sum(p.numel() * p.element_size() for c in model.chunks for p in c.parameters())
    return {"weights": weights, "grads": sum(4 * buf.grad_data.numel() for buf in model.grad_buffers),
            "main weights": sum(4 * t.main.numel() for t in optimized if t.main is not t.model),
            "optimizer state": sum(t.main.numel() * state_bytes_per_element(muon and uses_muon(t.param))
                                   for t in optimized)}


def describe_memory(model: TrainingModel, dp: int) -> str:
    """Rank 0's memory_parts and the bytes per parameter they amount to (fp32 16, bf16 18; ZeRO-1
    8 + 8/dp, 6 + 12/dp; ZeRO-2 4 + 12/dp, 2 + 16/dp; ZeRO-3 16/dp, 18/dp plus the layers
    gathered at the time)."""
    params = [p for c in model.chunks for p in c.parameters()]
    n = sum(p.numel() for p in params)
    buckets = [b for buf in model.grad_buffers for b in buf.buckets]
    sharded = isinstance(model.optimizer, DistributedOptimizer)
    offload = any(t.device_grad is not None for t in model.optimizer.tensors)
    parts = memory_parts(model)
    mb = 2**20
    dtype = str(params[0].dtype).removeprefix("torch.")
    if any(b.shard_params for b in buckets):
        how = (f"; ZeRO-3: all of it sharded over dp={dp}, plus the layers gathered at the time "
               "(two: one running, one prefetched)")
    elif any(b.shard_grads for b in buckets):
        how = f"; ZeRO-2: grads, main weights and moments sharded over dp={dp}"
    elif sharded:
        how = f"; distributed optimizer: main weights and moments sharded over dp={dp}"
    elif isinstance(model.optimizer, ParameterServerOptimizer) and dp > 1:
        how = f"; parameter server: rank 0 serves dp={dp}, its {dp - 1} workers hold no main weights or moments"
    else:
        how = "; --use-distributed-optimizer shards them over dp"
    return ("> memory on rank 0: " + " + ".join(f"{k} {v / mb:.2f} MB" for k, v in parts.items() if v)
            + f" = {sum(parts.values()) / n:.1f} bytes per parameter ({dtype} weights, fp32 grads"
            + (", main weights and " if parts["main weights"] else " and ") + _state_name(model)
            + (" (those two in host memory)" if offload else "") + how + ")")


def _state_name(model: TrainingModel) -> str:
    if isinstance(model.optimizer.optimizer, Muon):
        return "Muon momentum (the matrices) and Adam moments (the rest)"
    return "Adam moments"


def describe_muon(config: Config) -> str:
    """Muon's Newton-Schulz work per step against the model's (planner/flops.py)."""
    ns, step = newton_schulz_flops(config.model, config.train), flops_per_step(config.model,
                                                                                config.train.global_batch_size)
    return (f"> muon: Newton-Schulz {ns / 1e9:.3f} GFLOP per step for the whole model ({100 * ns / step:.2f} % of "
            f"the model's {step / 1e9:.1f} GFLOP, not in MFU), {config.train.muon_num_ns_steps} steps on each full "
            "matrix, duplicated on each of its tp ranks")


def print_run(config: Config, model: TrainingModel, grid: parallel_state.Grid, device: torch.device) -> None:
    """The start-up report: layout, model, memory, activations, the planner's prediction, the run."""
    cfg = config.train
    n_params = sum(p.numel() for c in model.chunks for p in c.parameters())
    tp, dp = grid.size("tp"), grid.size("dp")
    print_rank_0(describe_layout(grid, config.parallel))
    print_rank_0(describe_model(config, n_params))
    print_rank_0(describe_memory(model, dp))
    if cfg.optimizer == "muon":
        print_rank_0(describe_muon(config))
    par = config.parallel
    layers_per_chunk = config.model.num_layers // (par.pipeline_model_parallel_size * par.vpp)
    print_rank_0(describe_activation_memory(config.model, layers_per_chunk, par.vpp, cfg.micro_batch_size, tp,
                                            par.sequence_parallel, cfg.reset_position_ids))
    print_rank_0(describe_plan(config, memory_parts(model)))
    print_rank_0(f"{describe_training(config)}, on {device}" + _describe_loss_scale(model.optimizer.loss_scaler))


def describe_model(config: Config, rank_0_params: int) -> str:
    model = config.model
    sliding = sum(window is not None for window in model.layer_windows)
    mtp = f" + {model.mtp_depths} multi-token prediction" if model.mtp_depths else ""
    return (f"> model: {model.family} family, {model.num_layers} layers{mtp}, hidden {model.hidden_size}, "
            f"{rank_0_params:,} parameters on rank 0, padded vocab "
            f"{model.padded_vocab_size(config.parallel.tensor_model_parallel_size)}"
            + (f", sliding window {model.window_size} on {sliding} of {model.num_layers} layers" if sliding else ""))


def describe_training(config: Config) -> str:
    """The iterations and how a global batch is made up."""
    cfg, dp = config.train, config.parallel.data_parallel_size
    return (f"> training: {cfg.train_iters} iterations of global batch {cfg.global_batch_size} x "
            f"{config.model.seq_length} tokens, micro batch {cfg.micro_batch_size} x {cfg.num_microbatches(dp)} "
            f"microbatches x dp {dp}, in {str(cfg.params_dtype).removeprefix('torch.')}")


def _describe_loss_scale(scaler) -> str:
    if scaler is None:
        return ""
    return f", {'dynamic' if scaler.dynamic else 'static'} loss scale {scaler.scale:g}"
