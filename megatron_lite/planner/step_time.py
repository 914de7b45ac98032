"""How long a layout's optimizer step takes on a cluster, and where the time goes.

compute   the busiest pipeline stage's forward and backward per microbatch and the optimizer
          step (planner/compute.py: GEMMs at the efficiency their shape reaches, attention at a
          flash kernel's, the memory-bound ops' bytes at the HBM bandwidth reached, a fixed cost
          per kernel; the numbers in planner/calibration.py).
          The slowest stage (the last: it also computes the logits) sets the pace.
comm      alpha-beta per collective: T = steps·alpha + wire bytes / bandwidth, ring wire bytes
          (comm.ring_wire_bytes) of the traffic formula (planner/traffic.py), on NVLink when
          the group lies inside a node (the rank grid is tp-cp-dp-pp, tp fastest), else on the
          per-GPU network link, each at the fraction of its datasheet bandwidth NCCL reaches.
overlap   what the code overlaps (_exposed): the grad buckets' reductions with the last
          microbatch's backward (ZeRO-2: with every backward), except the bucket completed last
          and the deferred ones; ZeRO-3's gathers with the layer before them, so the first
          layer's gather forward and backward and the last reduce-scatter wait; the all-gather
          after the step with the next forward only under --overlap-param-gather; ring
          attention's K/V exchange with its blocks. Tensor-parallel collectives and pipeline
          sends are exposed in this code (software.py: which codes overlap them).
bubble    (p-1)/(v·m) of the stage's compute (planner/schedule.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_lite.comm import ring_steps, ring_wire_bytes
from megatron_lite.config import Config
from megatron_lite.pipeline_parallel.partition import last_stage_rank
from megatron_lite.planner.calibration import calibration
from megatron_lite.planner.compute import StageCompute, stage_compute
from megatron_lite.planner.flops import flops_per_step
from megatron_lite.planner.hardware import GPU
from megatron_lite.planner.memory import RankCoords, activation_memory, grad_buffers, rank_params, state_memory
from megatron_lite.planner.schedule import bubble_fraction, num_microbatches
from megatron_lite.planner.software import THIS_CODE, Software
from megatron_lite.planner.traffic import step_traffic

DATA_GROUPS = ("dp-cp", "edp")  # the grad buffers' reductions and the parameters' gathers


@dataclass
class StepEstimate:
    memory: dict[str, float]  # bytes per part on the busiest rank
    traffic: dict[str, float]  # wire bytes per group per step, per rank
    compute_s: float
    compute_parts: dict[str, float]  # compute_s by kind: gemm, attention, memory, recompute, kernels, optimizer
    bubble_s: float
    comm_s: dict[str, float]  # per group, on the wire
    exposed_comm_s: float
    step_s: float
    tokens_per_s: float
    mfu: float
    hardware_tflops: float  # per GPU, recomputation counted (what Megatron's papers report)
    fits: bool

    @property
    def peak_memory(self) -> float:
        return sum(self.memory.values())


def _group_sizes(config: Config) -> dict[str, int]:
    par = config.parallel
    tp, cp, pp, dp, ep = (par.tensor_model_parallel_size, par.context_parallel_size, par.pipeline_model_parallel_size,
                          par.data_parallel_size, par.expert_model_parallel_size)
    return {"tp": tp, "cp": cp, "pp": pp, "dp": dp, "dp-cp": dp * cp, "mp": tp * pp, "embedding": 2, "ep": ep,
            "edp": tp * cp * dp // ep, "tp-cp": tp * cp}


def _group_span(config: Config, group: str) -> int:
    """Consecutive global ranks the group's members spread over (grid axes tp, cp, dp, pp, fastest first)."""
    par = config.parallel
    tp, cp, dp, pp = (par.tensor_model_parallel_size, par.context_parallel_size, par.data_parallel_size,
                      par.pipeline_model_parallel_size)
    return {"tp": tp, "cp": tp * cp, "dp": tp * cp * dp, "dp-cp": tp * cp * dp, "tp-cp": tp * cp,
            "ep": max(par.expert_model_parallel_size, 1), "edp": tp * cp * dp, "pp": tp * cp * dp * min(pp, 2),
            "mp": tp * cp * dp * pp, "embedding": tp * cp * dp * pp}[group]


def _recompute_extra(config: Config) -> float:
    """Extra layer FLOPs recomputation replays, as a fraction of the layers' forward + backward."""
    model = config.model
    if model.recompute_granularity == "full":
        layers = model.num_layers // config.parallel.pipeline_model_parallel_size
        replayed = layers if model.recompute_method == "uniform" else min(model.recompute_num_layers, layers)
        return replayed / layers / 3
    if "core_attn" in model.selective_recompute:
        # The scores and the weighted sum, forward (4sh FLOPs per token of a layer's 24h^2 + 4sh).
        ratio = model.seq_length / model.hidden_size
        return ratio / (3 * (6 + ratio))
    return 0.0


def estimate(config: Config, gpu: GPU, software: Software = THIS_CODE,
             overlap_grad_reduce: bool = True, mean_document_length: float | None = None) -> StepEstimate:
    """The step of `config` (its parallel layout and batch) on GPUs of type `gpu`, run by
    `software` (default: this code; --validate predicts a published run with the code that ran
    it). `overlap_grad_reduce` False: the data-parallel reduction waits for the whole backward
    (plain DP, the seed tables' "DP"). `mean_document_length`: the documents' mean length in
    tokens under --reset-attention-mask (documents of that length, packed: attention and the
    FLOPs count only each document's own keys); None: as long as the sequence."""
    model, par, train = config.model, config.parallel, config.train
    tp, cp, pp, dp, vpp = (par.tensor_model_parallel_size, par.context_parallel_size, par.pipeline_model_parallel_size,
                           par.data_parallel_size, par.vpp)
    world = tp * cp * pp * dp
    m = num_microbatches(config)
    cal = calibration(gpu)
    documents = mean_document_length if config.train.reset_attention_mask else None
    stage = stage_compute(config, gpu, cal, software, documents)
    busy = m * (stage.forward_s + stage.backward_s)
    compute = busy + stage.optimizer_s
    bubble = bubble_fraction(pp, vpp, m, par.schedule) * busy if pp > 1 else 0.0

    last = RankCoords(pp=last_stage_rank(pp, par.v_shape), dp=dp * cp - 1)
    traffic = step_traffic(config, last)
    sizes = _group_sizes(config)
    times: dict[tuple[str, str], float] = {}
    wire: dict[str, float] = {}
    for (op, group), nbytes in traffic.items():
        n = sizes[group]
        intra = _group_span(config, group) <= gpu.gpus_per_node
        bandwidth = gpu.nvlink_bandwidth * cal.nvlink if intra else gpu.network_bandwidth * cal.network
        latency = gpu.nvlink_latency if intra else gpu.network_latency
        moved = ring_wire_bytes(op, n, nbytes)
        if software.pp_sends_split_over_tp and group == "pp" and not par.sequence_parallel:
            moved /= tp
        wire[group] = wire.get(group, 0.0) + moved
        times[(op, group)] = moved / bandwidth + ring_steps(op, n) * latency * _calls(config, op, group, m)
    comm = {group: sum(t for (_, g), t in times.items() if g == group) for group in wire}
    if par.parameter_server and dp > 1:
        _parameter_server_link(config, gpu, comm, wire)
    exposed = _exposed(config, times, comm, stage, m, software, overlap_grad_reduce and not par.parameter_server)
    step = compute + bubble + exposed
    tokens = train.global_batch_size * model.seq_length
    peak = gpu.peak_tflops * 1e12
    memory = _peak_memory(config)
    total = flops_per_step(model, train.global_batch_size, documents)
    layer_flops = flops_per_step(dataclasses.replace(model, vocab_size=0), train.global_batch_size,  # no output layer
                                 documents)
    hardware_flops = (layer_flops * (1 + _recompute_extra(config)) + total - layer_flops) / world
    parts = {name: m * seconds for name, seconds in stage.parts.items()} | {"optimizer": stage.optimizer_s}
    return StepEstimate(memory=memory, traffic=wire, compute_s=compute, compute_parts=parts, bubble_s=bubble,
                        comm_s=comm, exposed_comm_s=exposed, step_s=step, tokens_per_s=tokens / step,
                        mfu=total / (step * world * peak), hardware_tflops=hardware_flops / step / 1e12,
                        fits=sum(memory.values()) <= 0.95 * gpu.memory_bytes)


def _parameter_server_link(config: Config, gpu: GPU, comm: dict[str, float], wire: dict[str, float]) -> None:
    """The server's link carries every worker's grads in and the parameters out to each of them:
    (dp-1) x the larger of the two, whatever the number of workers (the bottleneck of the seed
    documents' parameter server), while a ring all-reduce sends 2(dp-1)/dp x the grads per rank."""
    par = config.parallel
    dp = par.data_parallel_size
    server = step_traffic(config, RankCoords(pp=par.pipeline_model_parallel_size - 1, dp=0))
    sent = server.get(("send", "dp"), 0.0)
    received = (dp - 1) * step_traffic(config, RankCoords(pp=par.pipeline_model_parallel_size - 1, dp=1)).get(
        ("send", "dp"), 0.0)
    intra = _group_span(config, "dp") <= gpu.gpus_per_node
    cal = calibration(gpu)
    bandwidth, latency = ((gpu.nvlink_bandwidth * cal.nvlink, gpu.nvlink_latency) if intra
                          else (gpu.network_bandwidth * cal.network, gpu.network_latency))
    wire["dp"] = sent
    comm["dp"] = max(sent, received) / bandwidth + 2 * (dp - 1) * latency


def _peak_memory(config: Config) -> dict[str, float]:
    """The memory parts of the rank with the largest total: the first stage keeps the most
    microbatches in flight, the last holds the output layer and the logits; the last shard of
    a bucket holds its padding, and a parameter server (dp index 0) all the optimizer state."""
    par = config.parallel
    dp_index = 0 if par.parameter_server else par.data_parallel_size * par.context_parallel_size - 1
    best: dict[str, float] = {}
    for stage in {0, par.pipeline_model_parallel_size - 1}:
        memory: dict[str, float] = dict(state_memory(config, RankCoords(pp=stage, dp=dp_index)))
        memory["activations"] = activation_memory(config, stage)
        memory["buffers"] = _buffers(config, memory)
        if sum(memory.values()) > sum(best.values()):
            best = memory
    return best


def _calls(config: Config, op: str, group: str, m: int) -> int:
    """About how many collectives of one kind a step runs (for their latency terms): per
    microbatch and layer on tp and cp, per microbatch on pp, per bucket on the data-parallel
    groups (ZeRO-2/3: per microbatch; ZeRO-3's gathers twice)."""
    par = config.parallel
    layers = config.model.num_layers // par.pipeline_model_parallel_size
    if group == "tp":
        return 4 * layers * m
    if group == "cp":
        return 3 * layers * m * par.context_parallel_size
    if group == "pp":
        return 2 * m
    if group in DATA_GROUPS:
        last = last_stage_rank(par.pipeline_model_parallel_size, par.v_shape)
        buckets = sum(len(buf.buckets) for params in rank_params(config, last) for buf in grad_buffers(config, params))
        per_microbatch = {"optim_grads": op == "reduce_scatter",
                          "optim_grads_params": 1 + (op == "all_gather")}.get(par.sharding, 0)
        return buckets * (m * per_microbatch or 1)
    return 1


def _chunk_buckets(config: Config) -> list[tuple[float, float]]:
    """Per model chunk of the last stage: (its share of the rank's grad-buffer elements, the
    share of those whose reduction starts only once its backward is over: the bucket completed
    last, which holds the chunk's first parameters, and the deferred buckets, reduced after the
    tp / embedding sums)."""
    par = config.parallel
    chunks = []
    for params in rank_params(config, last_stage_rank(par.pipeline_model_parallel_size, par.v_shape)):
        sizes = [(end - start, deferred) for buf in grad_buffers(config, params)
                 for (start, end, _), deferred in zip(buf.buckets, buf.deferred)]
        plain = [size for size, deferred in sizes if not deferred]
        waiting = sum(size for size, deferred in sizes if deferred) + (plain[-1] if plain else 0)
        chunks.append((sum(size for size, _ in sizes), waiting))
    total = sum(size for size, _ in chunks) or 1
    return [(size / total, tail / size if size else 0.0) for size, tail in chunks]


def _data_parallel_waits(config: Config, reduce: float, gather: float, stage: StageCompute) -> float:
    """The grad reduction of the last microbatch's backward and the parameters' all-gather after
    the step, on one stream (ZeRO-1 and plain DP; ZeRO-2's per-microbatch reductions: _exposed).
    Each chunk's buckets reduce as its last backward produces them, its tail after it; under the
    interleaved schedule chunk k's last backward ends k·pp chunk passes before the step's last
    (the cooldown runs the last microbatches chunk by chunk), so its reduction has those to hide
    behind. The all-gather of chunk k must be done by the end of its first forward, k·pp chunk
    passes into the next step; without --overlap-param-gather it waits whole."""
    par = config.parallel
    chunks = _chunk_buckets(config)
    spacing = par.pipeline_model_parallel_size if par.schedule == "interleaved" else 0
    backward, forward = stage.backward_s / len(chunks), stage.forward_s / len(chunks)
    clock = float("-inf")
    for k in reversed(range(len(chunks))):  # the last chunk's backward finishes first
        share, tail = chunks[k]
        end = -k * spacing * backward
        clock = max(clock, end - backward) + (1 - tail) * share * reduce
        clock = max(clock, end) + tail * share * reduce
    waits = max(0.0, clock)
    if not par.overlap_param_gather:
        return waits + gather
    clock = late = 0.0
    for k, (share, _) in enumerate(chunks):
        clock += share * gather
        late = max(late, clock - (k * spacing + 1) * forward)
    return waits + late


def _exposed(config: Config, times: dict[tuple[str, str], float], comm: dict[str, float], stage: StageCompute,
             m: int, software: Software, overlap_grad_reduce: bool) -> float:
    """The communication time the step waits for (module docstring: what overlaps); without
    `overlap_grad_reduce` the data-parallel reduction overlaps nothing."""
    par = config.parallel
    busy = m * (stage.forward_s + stage.backward_s)
    exposed = comm.get("mp", 0.0) + comm.get("embedding", 0.0) + comm.get("ep", 0.0) + comm.get("dp", 0.0)
    for group, overlapped in (("tp", software.tp_comm_overlap), ("pp", software.pp_overlap)):
        exposed += max(0.0, comm.get(group, 0.0) - busy) if overlapped else comm.get(group, 0.0)
    exposed += max(0.0, comm.get("cp", 0.0) - (busy / 3 if par.cp_comm_type == "p2p" else 0.0))
    gather = sum(t for (op, group), t in times.items() if group in DATA_GROUPS and op == "all_gather")
    reduce = sum(t for (op, group), t in times.items() if group in DATA_GROUPS and op != "all_gather")
    if par.sharding == "optim_grads_params":
        return exposed + m * _zero3_exposed(gather / m / 2, reduce / m, stage)
    if not overlap_grad_reduce:
        return exposed + reduce + gather
    if par.sharding == "optim_grads":  # each microbatch's reduce-scatter overlaps its own backward
        tail = sum(share * tail for share, tail in _chunk_buckets(config))
        per_backward = reduce / m
        exposed += m * (tail * per_backward + max(0.0, (1 - tail) * per_backward - stage.backward_s))
        return exposed + _data_parallel_waits(config, 0.0, gather, stage)
    return exposed + _data_parallel_waits(config, reduce, gather, stage)


def _zero3_exposed(gather: float, reduce: float, stage: StageCompute) -> float:
    """ZeRO-3's wait per microbatch: each layer's gather (`gather` for all of a pass) is started
    during the layer before it (param_sharding.py), so the first one of the forward and of the
    backward waits whole, each other one by what its predecessor's compute does not cover; the
    backward's reduce-scatters share the stream, and the last one waits whole."""
    units = stage.layers + 1  # the layers and the embedding / output layer
    g, r = gather / units, reduce / units
    forward, backward = stage.forward_s / units, stage.backward_s / units
    return (g + (units - 1) * max(0.0, g - forward)) + (g + (units - 1) * max(0.0, g + r - backward) + r)


def _buffers(config: Config, memory: dict[str, float]) -> float:
    """Transient bytes beside the state and activations (the logits the loss keeps are
    activations already): ZeRO-3's gathered working set, two layers' full parameters and grads;
    ZeRO-2's full grads of the two layers being reduced."""
    par, train = config.parallel, config.train
    layers = max(config.model.num_layers // par.pipeline_model_parallel_size, 1)
    dp = par.data_parallel_size * par.context_parallel_size
    if par.sharding == "optim_grads_params":  # weights and grads are this rank's shards
        return 2 * memory["weights"] / train.params_dtype.itemsize * dp / layers * (train.params_dtype.itemsize + 4)
    if par.sharding == "optim_grads":
        return 2 * memory["grads"] * dp / layers
    return 0.0
