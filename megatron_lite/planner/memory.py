"""Bytes one rank holds for a layout, by formula: weights, grads, fp32 main weights, optimizer
state (AdamW's two fp32 moments per element; under --optimizer muon one fp32 momentum buffer for
the hidden layers' matrices; exactly as allocated: each bucket's padding and each ZeRO shard counted as the grad
buffers lay them out), activations (activation_memory.py's formula times the microbatches the
schedule keeps in flight) and transient buffers.

Every rank of a pipeline stage holds the same except for the last data-parallel shard of a
bucket, which may include the bucket's padding: the functions take the rank's coordinates.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_lite.config import Config
from megatron_lite.distributed.data_parallel import bucket_spans, buffer_order
from megatron_lite.optimizer.optimizer import state_bytes_per_element
from megatron_lite.pipeline_parallel.partition import last_stage_rank, stage_ends
from megatron_lite.planner.activation_memory import embedding_bytes, head_bytes, loss_bytes, stage_bytes
from megatron_lite.planner.parameters import ParamSpec, chunk_params
from megatron_lite.planner.schedule import in_flight, num_microbatches, zero_bubble_peak


@dataclass(frozen=True)
class RankCoords:
    pp: int = 0  # pipeline rank
    dp: int = 0  # index in the dense grads' group (dp x cp, GRAD_GROUP)
    edp: int = 0  # index in the experts' data-parallel group


@dataclass(frozen=True)
class BufferLayout:
    """A grad buffer's buckets: (start, padded end, elements of parameters) each, and its group size."""
    buckets: list[tuple[int, int, int]]
    group_size: int
    deferred: list[bool]  # reduced only after backward (partial grads: tp or embedding sums first)
    shard_grads: list[bool]
    shard_params: list[bool]
    gathers: list[int]  # ZeRO-3: all-gathers of the bucket per microbatch
    members: list[list[ParamSpec]]  # each bucket's parameters, in its order


def grad_buffers(config: Config, params: list[ParamSpec]) -> list[BufferLayout]:
    """The dense buffer and (with experts) the experts' buffer of one chunk, as parameterize builds them."""
    par = config.parallel
    tp, cp, dp, ep = par.tensor_model_parallel_size, par.context_parallel_size, par.data_parallel_size, \
        par.expert_model_parallel_size
    zero2, zero3 = par.sharding in ("optim_grads", "optim_grads_params"), par.sharding == "optim_grads_params"
    kinds = [(False, dp * cp)] + ([(True, tp * cp * dp // ep)] if config.model.num_experts else [])
    layouts = []
    for expert, group in kinds:
        chosen = [p for p in params if p.expert == expert]
        ordered = buffer_order(chosen, lambda p: p.deferred)
        spans = bucket_spans([(p.numel, p.deferred, p.unit if zero3 and not p.deferred else None) for p in ordered],
                             par.ddp_bucket_size, group)
        deferred = [ordered[members[0]].deferred for _, _, members in spans]
        layouts.append(BufferLayout([(s, e, sum(ordered[i].numel for i in members)) for s, e, members in spans],
                                    group, deferred, [zero2 and not d for d in deferred],
                                    [zero3 and not d for d in deferred],
                                    [ordered[members[0]].gathers for _, _, members in spans],
                                    [[ordered[i] for i in members] for _, _, members in spans]))
    return layouts


def rank_params(config: Config, pp_rank: int) -> list[list[ParamSpec]]:
    """The tensors of each model chunk of pipeline rank `pp_rank`."""
    par = config.parallel
    return [chunk_params(config.model, par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.vpp,
                         par.expert_model_parallel_size, par.sequence_parallel, pp_rank, c, par.v_shape)
            for c in range(par.vpp)]


def _shard_elements(start: int, end: int, members: list[ParamSpec], index: int,
                    size: int) -> list[tuple[ParamSpec, int]]:
    """Each parameter of a bucket [start, end) (laid out from start, padding after them) with its
    elements in shard `index` of `size`."""
    width = (end - start) // size
    lo, offset, out = start + index * width, start, []
    for p in members:
        out.append((p, max(0, min(lo + width, offset + p.numel) - max(lo, offset))))
        offset += p.numel
    return out


def state_memory(config: Config, rank: RankCoords = RankCoords()) -> dict[str, int]:
    """Bytes of weights, fp32 grads, fp32 main weights and optimizer state on one rank, as
    training.memory_parts reports them from the allocated tensors."""
    weights, grads, optimized = _rank_state(config, rank)
    muon = config.train.optimizer == "muon"
    half = config.train.params_dtype.itemsize != 4
    return {"weights": weights, "grads": grads, "main weights": 4 * sum(n for _, n in optimized) if half else 0,
            "optimizer state": sum(n * state_bytes_per_element(muon and p.matrix) for p, n in optimized)}


def optimizer_elements(config: Config, rank: RankCoords = RankCoords()) -> tuple[int, int]:
    """The elements one rank's optimizer updates: (by AdamW, by Muon)."""
    optimized = _rank_state(config, rank)[2]
    muon = sum(n for p, n in optimized if p.matrix) if config.train.optimizer == "muon" else 0
    return sum(n for _, n in optimized) - muon, muon


def _rank_state(config: Config, rank: RankCoords) -> tuple[int, int, list[tuple[ParamSpec, int]]]:
    """Bytes of weights and of fp32 grads on one rank, and the elements its optimizer updates, by parameter."""
    par, train = config.parallel, config.train
    pbytes = train.params_dtype.itemsize
    weights = grads = 0
    optimized: list[tuple[ParamSpec, int]] = []  # the elements the optimizer updates here, by parameter
    for params in rank_params(config, rank.pp):
        if not par.sharded_optimizer:
            weights += pbytes * sum(p.numel for p in params)
            optimized += [(p, p.numel) for p in params]
        for i, buf in enumerate(grad_buffers(config, params)):
            index = rank.edp if i else rank.dp
            for (start, end, _), sg, sp, members in zip(buf.buckets, buf.shard_grads, buf.shard_params, buf.members):
                size = end - start
                grads += 4 * (size // buf.group_size if sg else size)
                if par.sharded_optimizer:
                    weights += pbytes * (size // buf.group_size if sp else size)
                    optimized += _shard_elements(start, end, members, index, buf.group_size)
    if par.parameter_server and rank.dp != 0:
        optimized = []  # a parameter server's workers hold no optimizer state
    return weights, grads, optimized


def logits_kept(config: Config) -> bool:
    """Whether the loss keeps the logits for backward: the plain loss does, the fused kernel
    (ModelConfig.fused_kernels on a GPU) does not."""
    return not (config.model.fused_kernels and config.train.device == "cuda")


def activation_memory(config: Config, pp_rank: int = 0) -> int:
    """Peak bytes saved for backward on pipeline rank `pp_rank`: the microbatches the schedule
    keeps in flight at its peak (planner/schedule.py), each holding a chunk's layers
    (activation_memory.stage_bytes), on the first stage the embedding's ids and on the last the
    output head's tensors."""
    par, model, mb = config.parallel, config.model, config.train.micro_batch_size
    tp, cp, pp, vpp = (par.tensor_model_parallel_size, par.context_parallel_size, par.pipeline_model_parallel_size,
                       par.vpp)
    local = dataclasses.replace(model, seq_length=model.seq_length // cp)
    # The formula counts fp32 tensors; under --bf16/--fp16 the layers' tensors take 2 bytes (their
    # few fp32 statistics are not told apart), the loss's stay fp32.
    half = config.train.params_dtype.itemsize / 4
    per_chunk = half * stage_bytes(local, model.num_layers // (pp * vpp), mb, tp, par.sequence_parallel,
                                   par.cp_comm_type if cp > 1 else None, config.train.reset_position_ids)
    if par.schedule in ("zb-h1", "zbv") and pp > 1:
        return int(_zero_bubble_activations(config, pp_rank, local, per_chunk))
    chunks = in_flight(config, pp_rank)
    total = sum(chunks) * per_chunk
    if pp_rank == 0:
        total += chunks[0] * embedding_bytes(local, mb)
    if pp_rank == last_stage_rank(pp, par.v_shape):  # its last chunk is the last stage
        total += chunks[-1] * head_bytes(local, mb, tp, par.sequence_parallel, logits_kept(config),
                                         par.cp_comm_type if cp > 1 else None)
    return int(total)


def _zero_bubble_activations(config: Config, pp_rank: int, local, per_chunk: float) -> float:
    """Peak bytes under a zero-bubble schedule, walking the rank's passes: F saves a chunk's
    tensors (and the embedding's or the head's on the first and last stage), B frees the loss's
    (only the input gradient reads them), W the rest."""
    par, mb = config.parallel, config.train.micro_batch_size
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    ends = [stage_ends(pp, par.vpp, pp_rank, c, par.v_shape) for c in range(par.vpp)]
    head = head_bytes(local, mb, tp, par.sequence_parallel, logits_kept(config),
                      par.cp_comm_type if par.context_parallel_size > 1 else None)
    loss = loss_bytes(local, mb, tp, logits_kept(config))

    def change(kind: str, chunk: int) -> float:
        first, last = ends[chunk]
        saved = per_chunk + (embedding_bytes(local, mb) if first else 0) + (head if last else 0)
        return {"F": saved, "B": -loss if last else 0.0, "W": -(saved - (loss if last else 0.0))}[kind]
    return zero_bubble_peak(par.schedule, pp, pp_rank, num_microbatches(config), change)
