"""How long a layout's optimizer step takes on a cluster, and where the time goes.

compute   each GEMM's FLOPs at `gemm_efficiency` of the GPU's dense bf16 peak (the one
          calibration: what fraction of peak well-shaped GEMMs reach), plus the elementwise
          ops (norms, residual adds, activations, RoPE, softmax) at HBM bandwidth: their bytes
          are what makes small hidden sizes less efficient than large ones. Recomputation
          adds the forward it replays. The slowest pipeline stage (the last: it also computes
          the logits) sets the pace.
comm      alpha-beta per collective: T = steps·alpha + wire bytes / bandwidth, ring wire bytes
          (comm.ring_wire_bytes) of the traffic formula (planner/traffic.py), on NVLink when
          the group lies inside a node (the rank grid is tp-cp-dp-pp, tp fastest), else on the
          per-GPU network link.
overlap   what the code overlaps: the data-parallel grad reduction with the last microbatch's
          backward (ZeRO-2: with every backward; ZeRO-3's parameter gathers with the layers before
          them); --overlap-param-gather's all-gather with the next step's first forward; ring
          attention's K/V exchange with its blocks. Tensor-parallel and pipeline sends are
          exposed (no tp-comm overlap here).
bubble    (p-1)/(v·m) of the stage's compute (planner/schedule.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_lite.comm import ring_steps, ring_wire_bytes
from megatron_lite.config import Config
from megatron_lite.pipeline_parallel.partition import last_stage_rank
from megatron_lite.planner.flops import flops_per_step
from megatron_lite.planner.hardware import GPU
from megatron_lite.planner.memory import RankCoords, activation_memory, state_memory
from megatron_lite.planner.schedule import bubble_fraction, num_microbatches
from megatron_lite.planner.traffic import step_traffic

GEMM_EFFICIENCY = 0.7  # the one calibration: fitted once to the published tables (docs/planner.md)


@dataclass
class StepEstimate:
    memory: dict[str, float]  # bytes per part on the busiest rank
    traffic: dict[str, float]  # wire bytes per group per step, per rank
    compute_s: float
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


def _elementwise_bytes(config: Config, attention: str) -> float:
    """Bytes the non-GEMM ops of one layer read and write per token, forward, on one rank.
    Replicated over tp unless SP: the two norms (read h, write h) and residual adds (read 2h,
    write h); split over tp: the activation (SwiGLU reads 2f, writes f; GELU f and f), RoPE
    (q and k), and attention: flash attention reads q, k, v and writes the output; unfused
    attention (Megatron 2021) writes and reads the s scores per head for the masked softmax and
    again for its dropout (2 + 2 + 1 bytes per score at 2-byte activations)."""
    model, par = config.model, config.parallel
    tp = par.tensor_model_parallel_size
    h, a, g, d, f = (model.hidden_size, model.num_attention_heads, model.num_query_groups, model.head_dim,
                     model.ffn_hidden_size)
    s = model.seq_length // par.context_parallel_size
    nbytes = config.train.params_dtype.itemsize
    replicated = 2 * 2 * h + 2 * 3 * h
    split = 3 * f if model.family == "llama" else 2 * f
    split += 2 * (a + g) * d if model.family == "llama" else 0
    split += (2 * a + 2 * g) * d if attention == "flash" else 0
    scores = 5 / 2 * a * s * 2 if attention == "unfused" else 0  # in elements of `nbytes`
    return nbytes * (replicated / (tp if par.sequence_parallel else 1) + (split + scores) / tp)


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


def estimate(config: Config, gpu: GPU, gemm_efficiency: float = GEMM_EFFICIENCY,
             megatron_2021: bool = False, overlap_grad_reduce: bool = True) -> StepEstimate:
    """The step of `config` (its parallel layout and batch) on GPUs of type `gpu`. `megatron_2021`:
    model the Megatron-LM that the published tables ran instead of this code: attention that
    materialises its scores (no flash attention), and pipeline sends split over the tp ranks
    (its scatter-gather optimisation; ours are split only under SP). `overlap_grad_reduce` False:
    the data-parallel reduction waits for the whole backward (plain DP, the seed tables' "DP")."""
    attention = "unfused" if megatron_2021 else "flash"
    model, par, train = config.model, config.parallel, config.train
    tp, cp, pp, dp, vpp = (par.tensor_model_parallel_size, par.context_parallel_size, par.pipeline_model_parallel_size,
                           par.data_parallel_size, par.vpp)
    world = tp * cp * pp * dp
    m = num_microbatches(config)
    last = RankCoords(pp=last_stage_rank(pp, par.v_shape), dp=dp * cp - 1)
    # FLOPs on the last stage: its layers' share and the whole output layer (loss).
    total = flops_per_step(model, train.global_batch_size)
    layer_flops = flops_per_step(dataclasses.replace(model, vocab_size=0), train.global_batch_size)  # no output layer
    head_flops = total - layer_flops
    stage_flops = (layer_flops * (1 + _recompute_extra(config)) / pp + head_flops) / (tp * cp * dp)
    tokens_per_rank = train.global_batch_size * model.seq_length / (dp * cp)
    # Forward + backward move about three times the forward's bytes; a replay adds its forward's.
    layers_here = model.num_layers // pp * (1 + _recompute_extra(config))
    elementwise_s = 3 * tokens_per_rank * layers_here * _elementwise_bytes(config, attention) / gpu.hbm_bandwidth
    compute = stage_flops / (gpu.peak_tflops * 1e12 * gemm_efficiency) + elementwise_s
    bubble = bubble_fraction(pp, vpp, m, par.schedule) * compute if pp > 1 else 0.0

    traffic = step_traffic(config, last)
    sizes = _group_sizes(config)
    comm: dict[str, float] = {}
    wire: dict[str, float] = {}
    for (op, group), nbytes in traffic.items():
        n = sizes[group]
        intra = _group_span(config, group) <= gpu.gpus_per_node
        bandwidth = gpu.nvlink_bandwidth if intra else gpu.network_bandwidth
        latency = gpu.nvlink_latency if intra else gpu.network_latency
        moved = ring_wire_bytes(op, n, nbytes)
        if megatron_2021 and group == "pp" and not par.sequence_parallel:
            moved /= tp
        steps = ring_steps(op, n)
        wire[group] = wire.get(group, 0.0) + moved
        comm[group] = comm.get(group, 0.0) + moved / bandwidth + steps * latency * _calls(config, op, group, m)
    if par.parameter_server and dp > 1:
        _parameter_server_link(config, gpu, comm, wire)
    exposed = _exposed(config, comm, compute, m, overlap_grad_reduce and not par.parameter_server)
    step = compute + bubble + exposed
    tokens = train.global_batch_size * model.seq_length
    peak = gpu.peak_tflops * 1e12
    memory = _peak_memory(config)
    hardware_flops = (layer_flops * (1 + _recompute_extra(config)) + head_flops) / world
    return StepEstimate(memory=memory, traffic=wire, compute_s=compute, bubble_s=bubble, comm_s=comm,
                        exposed_comm_s=exposed, step_s=step, tokens_per_s=tokens / step,
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
    bandwidth, latency = ((gpu.nvlink_bandwidth, gpu.nvlink_latency) if intra
                          else (gpu.network_bandwidth, gpu.network_latency))
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
    microbatch and layer on tp and cp, per microbatch on pp, per step on the data-parallel groups."""
    layers = config.model.num_layers // config.parallel.pipeline_model_parallel_size
    if group == "tp":
        return 4 * layers * m
    if group == "cp":
        return 3 * layers * m * config.parallel.context_parallel_size
    if group == "pp":
        return 2 * m
    return 1


def _exposed(config: Config, comm: dict[str, float], compute: float, m: int, overlap_grad_reduce: bool) -> float:
    """The communication time the step waits for (module docstring: what overlaps); without
    `overlap_grad_reduce` the data-parallel reduction overlaps nothing."""
    par = config.parallel
    backward_per_microbatch = compute / m * 2 / 3 if overlap_grad_reduce else 0.0
    exposed = comm.get("tp", 0.0) + comm.get("pp", 0.0) + comm.get("mp", 0.0) + comm.get("embedding", 0.0)
    exposed += max(0.0, comm.get("cp", 0.0) - (compute / 3 if par.cp_comm_type == "p2p" else 0.0))
    exposed += comm.get("ep", 0.0)
    data = comm.get("dp-cp", 0.0) + comm.get("edp", 0.0) + comm.get("dp", 0.0)
    if par.sharding == "optim_grads_params":
        exposed += max(0.0, data - compute)
    elif par.sharding == "optim_grads":
        exposed += max(0.0, data - m * backward_per_microbatch)
    elif par.sharded_optimizer:
        # Reduce-scatter overlaps the last backward; the all-gather after the step (half of it)
        # overlaps the next forward only with --overlap-param-gather.
        gather = data / 2
        exposed += max(0.0, data - gather - backward_per_microbatch)
        exposed += max(0.0, gather - compute / m / 3) if par.overlap_param_gather else gather
    else:
        exposed += max(0.0, data - backward_per_microbatch)
    return exposed


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
