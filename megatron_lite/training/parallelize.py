"""From a config to what this rank trains, in one fixed order (torchtitan's `parallelize` is the model):

  1. chunks      the model chunks of this rank's pipeline stage(s), each layer built by the
                 model's layer classes with this rank's tensor-parallel shard and a placement
                 on every parameter (pipeline_parallel/partition.py, model/, placement.py),
                 computing with the ops chosen once for the model (context parallelism's
                 attention among them); on the meta device: shapes and placements, no storage
  2. weights     storage on this rank's device, and there this rank's shard of the single-device
                 initial values drawn, never a full tensor (model/initialization.py), in bf16/fp16
                 under --bf16/--fp16 (Megatron's mixed precision: fp32 main copies live in the
                 optimizer); under ZeRO-3 the grad buffers draw, in step 4, only this rank's dp slice
  3. compile     with
                 --compile each transformer layer compiled (the unit torchtitan compiles: the
                 pipeline split and the tensor-parallel mappings between layers stay eager)
  4. buffers     a grad buffer per chunk, reduced over dp x cp in buckets during the last backward
                 (distributed/data_parallel.py; under ZeRO-2/3 reduce-scattered in every
                 backward, under ZeRO-3 the parameters sharded too and gathered per layer by
                 distributed/param_sharding.py); partial grads' buckets wait for their sums; a
                 second one per chunk for mixture-of-experts experts, summed over edp
  5. optimizer   AdamW over the whole chunks, or over this rank's dp x cp shard of the buffers;
                 under --data-parallel-mode parameter-server on the server (dp rank 0) only,
                 which steps for its workers (distributed/parameter_server.py)

Later parallelisms take their place in this order: activation recomputation wraps layers
between 3 and 4, fully sharded data parallelism hooks the chunks before 4.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.config import Config, ParallelConfig
from megatron_lite.context_parallel.attention import context_parallel_attention
from megatron_lite.distributed.data_parallel import GRAD_GROUP, DataParallelGrads
from megatron_lite.distributed.distributed_optimizer import DistributedOptimizer
from megatron_lite.distributed.grad_sync import needs_partial_grad_reduction
from megatron_lite.distributed.param_sharding import ShardedParams
from megatron_lite.distributed.parameter_server import ParameterServerGrads, ParameterServerOptimizer
from megatron_lite.model.gpt import GPTModel, init_range_, init_weights
from megatron_lite.model.ops import Ops, select_ops
from megatron_lite.optimizer.optimizer import LocalOptimizer
from megatron_lite.param_unit import ParamUnit
from megatron_lite.pipeline_parallel.partition import build_model_chunks
from megatron_lite.placement import is_expert


@dataclass
class TrainingModel:
    """This rank's model chunks, their data-parallel grad buffers and the optimizer over them."""
    chunks: list[nn.Module]
    grad_buffers: list[DataParallelGrads]  # one per chunk (dense parameters), then one per chunk for experts
    optimizer: LocalOptimizer | DistributedOptimizer | ParameterServerOptimizer

    def buffers_of(self, chunk: int) -> list[DataParallelGrads]:
        """The grad buffers of one model chunk (its dense buffer, and its experts' if any)."""
        return self.grad_buffers[chunk::len(self.chunks)]


def model_ops(config: Config) -> Ops:
    """What the layers compute with, chosen once: the fused kernels or plain torch, and with the
    sequence split over cp, attention that exchanges keys and values (context_parallel/)."""
    ops = select_ops(config.model.fused_kernels)
    if config.parallel.context_parallel_size > 1:
        ops = replace(ops, attention=context_parallel_attention(config.parallel.cp_comm_type, ops.attention,
                                                                ops.attention_block_forward,
                                                                ops.attention_block_backward))
    return ops


def build_chunks(config: Config) -> list[GPTModel]:
    """Step 1: this rank's model chunks (uninitialised)."""
    par, ops = config.parallel, model_ops(config)

    def build(layers: range, pre_process: bool, post_process: bool) -> GPTModel:
        return GPTModel(config.model, par.sequence_parallel, layers, pre_process, post_process, ops)
    return build_model_chunks(build, config.model.num_layers, par.vpp, par.v_shape)


def expert_grad_divisor(par: ParallelConfig) -> int:
    """What the experts' grads, summed over edp, divide by to be the global batch's mean: every
    dp x cp replica's tokens reach the experts once, and without sequence parallelism the tp
    ranks of a replica route the same tokens, so each arrives tp times."""
    grid = parallel_state.get_grid()
    return grid.size(GRAD_GROUP) * (1 if par.sequence_parallel else grid.size("tp"))


def parallelize(config: Config, device: torch.device) -> TrainingModel:
    """Steps 1 to 5 for this rank (the grid must be initialised)."""
    par = config.parallel
    zero3 = par.sharding == "optim_grads_params"
    with torch.device("meta"):  # no storage until each rank's shard is drawn, on its device
        chunks = build_chunks(config)
    for chunk in chunks:
        # Not chunk.to(dtype): the RoPE tables stay fp32. ZeRO-3's parameters get storage from their buffers below.
        chunk.materialize(device, config.train.params_dtype, storage=not zero3)
        if not zero3:
            init_weights(chunk, config.model, config.train.seed)
        if config.train.compile:
            mtp = chunk.mtp.layers if getattr(chunk, "mtp", None) is not None else []
            for layer in [*chunk.layers.values(), *(module.transformer_layer for module in mtp)]:
                layer.compile()
    experts = bool(config.model.num_experts)
    # Experts get buffers of their own, summed over the expert-data-parallel group.
    kinds = [dict(select=lambda p: not is_expert(p))] + (
        [dict(select=is_expert, group="edp", divisor=expert_grad_divisor(par))] if experts else [])
    units = [c.param_units() for c in chunks] if zero3 else None
    # A parameter server reduces the same buffers its own way (no experts, no sharding there).
    grads = ParameterServerGrads if par.parameter_server else DataParallelGrads
    buffers = [grads(c, par.ddp_bucket_size, shard=par.sharded_optimizer,
                     deferred=needs_partial_grad_reduction, overlap_param_gather=par.overlap_param_gather,
                     shard_grads=par.sharding in ("optim_grads", "optim_grads_params"), shard_params=zero3,
                     unit_of=_unit_index(units[i]) if zero3 else None,
                     initialize=_initializer(c, config) if zero3 else None, **kind)
               for kind in kinds for i, c in enumerate(chunks)]
    if par.sharded_optimizer:
        optimizer = DistributedOptimizer(buffers, config.train, experts)
    elif par.parameter_server:
        optimizer = ParameterServerOptimizer(chunks, buffers, config.train)
    else:
        optimizer = LocalOptimizer(chunks, config.train, experts)
    model = TrainingModel(chunks, buffers, optimizer)
    if zero3:
        for i in range(len(chunks)):
            ShardedParams(units[i], model.buffers_of(i))
    return model


def _initializer(chunk: nn.Module, config: Config) -> Callable[[nn.Parameter, torch.Tensor, int, int], None]:
    """What ZeRO-3's buffers draw the elements they keep of a parameter with: init_weights' values there."""
    names = {p: name for name, p in chunk.named_parameters()}
    return lambda p, out, lo, hi: init_range_(out, p, names[p], config.model, config.train.seed, lo, hi)


def _unit_index(units: list[ParamUnit]):
    """Which unit (the first, for a weight two units share) each parameter belongs to."""
    index: dict[nn.Parameter, int] = {}
    for i, unit in enumerate(units):
        for p in unit.params:
            index.setdefault(p, i)
    return index.__getitem__
