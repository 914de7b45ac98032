"""The bytes one rank's collectives move in one optimizer step, per (op, group), by formula:
what comm.METER counts when the step runs (its logical volume: an all-reduce's tensor, an
all-gather's gathered output, a reduce-scatter's unreduced input, a send's tensor; see
comm.py), so tests compare the two for equality. Ring wire bytes follow with `wire_bytes`.

With b the micro batch, s/cp the tokens of a sequence on a cp rank, h the hidden size and a
the activations' bytes per element, A = b·(s/cp)·h·a is one activation. Per microbatch:
- tp without SP: an all-reduce of A after each row-parallel linear (2 per layer) and of its
  input grad before each column-parallel one (2 per layer), the vocab-parallel embedding's
  forward and the output layer's input grad; with SP the same places all-gather and
  reduce-scatter A instead (4 + 4 per layer). Recomputed modules repeat their forward's.
  The vocab-parallel loss all-reduces 3 fp32 numbers per token (max, sum of exp, target logit).
  Multi-latent attention enters the tp region with what its up-projections read instead of the
  hidden state: its latents (q_lora_rank and kv_lora_rank wide, or h for linear_q_proj) and the
  shared rotated key (qk_pos_emb_head_dim), gathered under SP (their grads reduce-scattered), or
  their grads all-reduced; its down-projections run on this rank's tokens, outside the region.
- cp: ring attention sends K and V (K = b·(s/cp)·(g/tp)·d·a for g query groups of width d,
  multi-latent attention's padded width)
  to the next rank cp-1 times forward, again backward, and each block's dK, dV home; all-gather
  gathers K, V forward and backward and reduce-scatters dK, dV; Ulysses all-to-alls q, k, v
  and the output, and their grads. The loss sum and token count (2 fp32) over cp.
- pp: a stage sends each microbatch's output forward and its input grad backward,
  b·(s/cp)·h/(tp under SP)·a each, per model chunk boundary.
Per step: the data-parallel reduction of the grad buffers (bucket sizes from
planner/memory.py), the partial grads' sums (tp, embedding), the grad norm's squares (4 bytes
over each norm group) and the loss (fp64 mean over pp and dp).
Multi-token prediction: each module on the last stage repeats the embedding's, a layer's and the
head's collectives, with its projection's (see _mtp_tensor_parallel), its loss's over tp and cp,
and its mean over pp and dp.
Muon (--optimizer muon), per step: the distributed optimizer all-gathers, in fp32, each bucket
holding a matrix (every rank's pieces of the momentum update), and every matrix split over tp is
all-gathered whole over tp (fp32).
Mixture of experts: the token exchange per rank is the expectation of balanced routing (what a
rank receives depends on the router; the sum over an ep group is exact, dropless); the small
collectives of its routing statistics are not counted.
"""
from __future__ import annotations

from collections import defaultdict

from megatron_lite.comm import ring_wire_bytes
from megatron_lite.config import Config, ModelConfig
from megatron_lite.distributed.parameter_server import step_bytes
from megatron_lite.pipeline_parallel.partition import chunk_layers, stage_ends, virtual_stage
from megatron_lite.planner.memory import RankCoords, grad_buffers, rank_params
from megatron_lite.planner.parameters import mla_linears
from megatron_lite.planner.schedule import num_microbatches

Traffic = dict[tuple[str, str], float]


def _attention_entry(model: ModelConfig) -> int:
    """Elements per token a layer's attention all-gathers entering the tp region under SP (and whose
    grads it reduces): linear_qkv's input, the hidden state; multi-latent attention's up-projections'
    inputs instead (its latents, or the hidden state for linear_q_proj) and the shared rotated key."""
    if not model.multi_latent_attention:
        return model.hidden_size
    return sum(w.cols for w in mla_linears(model) if w.split == "column") + model.qk_pos_emb_head_dim


def _replayed(config: Config, layers: int) -> tuple[int, int, int]:
    """(elements per token all-gathered under SP, elements per token reduced: all-reduced or under SP
    reduce-scattered, cp attention passes) that recomputation repeats per microbatch on `layers`
    layers of a chunk.

    A replay runs forward only as far as the last tensor backward needs (torch's non-reentrant
    checkpoint stops there), so the reduction after a replayed group's last fc2 never reruns:
    a group of n layers repeats n attention entries and n fc1 inputs' gathers, 2n - 1 reductions
    and n attentions; the MLP alone repeats its input's gather; core attention only itself;
    mla_up_proj its attention entry (RoPE, after the rotated key's gather, keeps its tables)."""
    model = config.model
    h = model.hidden_size
    if model.recompute_granularity == "full":
        if model.recompute_method == "uniform":
            n = model.recompute_num_layers or 1
            groups = [min(n, layers - i) for i in range(0, layers, n)]
        else:
            groups = [1] * min(model.recompute_num_layers, layers)
        replayed = sum(groups)
        return replayed * (_attention_entry(model) + h), (2 * replayed - len(groups)) * h, replayed
    modules = model.selective_recompute
    entry = _attention_entry(model) if "mla_up_proj" in modules else 0
    return layers * (h * ("mlp" in modules) + entry), 0, layers * ("core_attn" in modules)


def step_traffic(config: Config, rank: RankCoords = RankCoords()) -> Traffic:
    """Bytes per (op, group) that `rank` records in one optimizer step."""
    model, par, train = config.model, config.parallel, config.train
    tp, cp, pp, dp, vpp = (par.tensor_model_parallel_size, par.context_parallel_size, par.pipeline_model_parallel_size,
                           par.data_parallel_size, par.vpp)
    sp, abytes, pbytes = par.sequence_parallel, train.params_dtype.itemsize, train.params_dtype.itemsize
    m, b, s, h = num_microbatches(config), train.micro_batch_size, model.seq_length // cp, model.hidden_size
    out: Traffic = defaultdict(float)
    chunks = [(c, virtual_stage(pp, rank.pp, c, par.v_shape)) for c in range(vpp)]  # (chunk, virtual stage)
    stages = [stage for _, stage in chunks]
    first, last = 0 in stages, pp * vpp - 1 in stages
    layers = model.num_layers // pp
    per_chunk = model.num_layers // (pp * vpp)
    token = b * s * abytes  # bytes of one element per token
    act = token * h
    gathers, reductions, cp_replay = (vpp * x for x in _replayed(config, per_chunk))
    # Multi-latent attention enters the tp region with its latents, not the hidden state (_attention_entry).
    entries = m * layers * (_attention_entry(model) - h) * token
    numbers = [n for c in range(vpp) for n in chunk_layers(model.num_layers, pp, vpp, rank.pp, c, par.v_shape)]
    moe_layers = sum(model.is_moe_layer(n) for n in numbers)
    # A mixture-of-experts layer's experts are not split over tp: only its shared expert's linears
    # (if any) gather and reduce like a dense MLP's.
    tp_linears = 4 * layers - (2 * moe_layers if not model.moe_shared_expert_intermediate_size else 0)
    depths = model.mtp_depths if last else 0  # the multi-token prediction modules, on the last stage
    if tp > 1:
        passes = m * (tp_linears + first + last)
        if sp:
            out[("all_gather", "tp")] += passes * act + entries + m * gathers * token
            out[("reduce_scatter", "tp")] += passes * act + entries + m * reductions * token
        else:
            out[("all_reduce", "tp")] += passes * act + entries + m * reductions * token
        if depths:
            _mtp_tensor_parallel(config, m * token, out)
        if last:
            out[("all_reduce", "tp")] += m * 3 * 4 * b * s * (1 + depths)
        partial_tp = sum(p.numel for chunk in rank_params(config, rank.pp) for p in chunk
                         if p.deferred and not p.expert) - _embedding_partial(config, rank)
        if partial_tp:
            out[("all_reduce", "tp")] += 4 * partial_tp
    if cp > 1:
        d, g = model.attention_padded_head_dim, model.num_query_groups // tp  # MLA: q, k, v padded to one width
        k = b * s * g * d * abytes
        q = b * s * (model.num_attention_heads // tp) * d * abytes
        passes, replays = m * (layers + depths), m * cp_replay
        if par.cp_comm_type == "p2p":
            out[("send", "cp")] += passes * (4 * (cp - 1) + 2 * cp) * k + replays * 2 * (cp - 1) * k
        elif par.cp_comm_type == "allgather":
            out[("all_gather", "cp")] += (2 * passes + replays) * cp * 2 * k
            out[("reduce_scatter", "cp")] += passes * cp * 2 * k
        else:
            out[("all_to_all", "cp")] += (2 * passes + replays) * (2 * q + 2 * k)
        if last:
            out[("all_reduce", "cp")] += m * 2 * 4 * (1 + depths)
    if pp > 1:
        boundary = b * s * h // (tp if sp else 1) * abytes
        # A stage sends its activations to the next one and its input gradients to the previous
        # one, except to a chunk of its own rank (ZB-V's turn on the last rank).
        for stage in stages:
            out[("send", "pp")] += m * boundary * sum(0 <= other < pp * vpp and other not in stages
                                                      for other in (stage + 1, stage - 1))
        out[("all_reduce", "pp")] += 8 * (1 + model.mtp_depths)  # the losses' means
        if model.embedding_on_last_stage and (first or last) and not par.v_shape:  # ZB-V: both copies on one rank
            out[("all_reduce", "embedding")] += 4 * _embedding_partial(config, rank)
    if model.num_experts:
        _moe_statistics(config, moe_layers, m, out)
    if moe_layers and par.expert_model_parallel_size > 1 and model.moe_token_dispatcher_type == "alltoall":
        out[("all_to_all", "ep")] += m * moe_layers * _token_exchange(config, abytes)
    if par.parameter_server:
        _parameter_server(config, rank, pbytes, out)
    else:
        _data_parallel(config, rank, m, pbytes, out)
    if train.optimizer == "muon":
        _muon(config, rank, out)
    norm_groups = ("dp-cp", "mp") if par.sharded_optimizer else ("mp",)
    sizes = {"dp-cp": dp * cp, "mp": tp * pp}
    for group in norm_groups:
        if sizes[group] > 1 and not (par.parameter_server and rank.dp != 0 and dp > 1):  # servers clip for workers
            out[("all_reduce", group)] += 4
    if dp > 1:
        out[("all_reduce", "dp")] += 8 * (1 + model.mtp_depths)  # the lm loss and each MTP module's, averaged
    return dict(out)


def _mtp_tensor_parallel(config: Config, token: float, out: Traffic) -> None:
    """The tp collectives of the multi-token prediction modules, `token` one element per token over
    the step's microbatches (act, one activation: h of them). Each module has the embedding's
    reduction, its transformer layer's linears (its attention's entry: _attention_entry) and the
    head's, as the model has, and around eh_proj: its input [embedding; hidden] (2 act) gathered
    (SP) or its grad all-reduced, the output's slices all-gathered to the whole width, and under SP
    the grad of its scatter back to this rank's tokens all-gathered."""
    model, sp = config.model, config.parallel.sequence_parallel
    act, entry = model.hidden_size * token, (_attention_entry(model) - model.hidden_size) * token
    for k in range(model.mtp_depths):
        moe_only = model.is_moe_layer(model.num_layers + k) and not model.moe_shared_expert_intermediate_size
        places = (4 - 2 * moe_only) + 2  # the layer's linears, the embedding and the head
        if sp:
            out[("all_gather", "tp")] += (places + 2 + 1 + 1) * act + entry
            out[("reduce_scatter", "tp")] += (places + 2) * act + entry
        else:
            out[("all_reduce", "tp")] += (places + 2) * act + entry
            out[("all_gather", "tp")] += act


def _moe_statistics(config: Config, moe_layers: int, m: int, out: Traffic) -> None:
    """The routers' small fp32 sums: per microbatch the balancing loss's expert counts over the
    ranks splitting a sequence; per step each layer's tokens per expert and loss share over them
    and the counts over dp, the step's statistics over pp, the experts' grad-norm squares."""
    model, par = config.model, config.parallel
    tp, cp, pp, dp, ep = (par.tensor_model_parallel_size, par.context_parallel_size, par.pipeline_model_parallel_size,
                          par.data_parallel_size, par.expert_model_parallel_size)
    experts = model.num_experts
    split, split_size = ("tp-cp", tp * cp) if par.sequence_parallel else ("cp", cp)
    if moe_layers and split_size > 1:
        if model.moe_router_load_balancing_type != "none" and model.moe_aux_loss_coeff > 0:
            per_layer = experts * (config.train.micro_batch_size if model.moe_router_load_balancing_type
                                   == "seq_aux_loss" else 1)
            out[("all_reduce", split)] += 4 * m * moe_layers * per_layer
        out[("all_reduce", split)] += 4 * moe_layers * (experts + 1)
    if moe_layers and dp > 1:
        out[("all_reduce", "dp")] += 4 * moe_layers * experts
    if pp > 1:
        out[("all_reduce", "pp")] += 12  # the loss, the balance and the layer count
    sizes = {"edp": tp * cp * dp // ep, "pp": pp, "ep": ep}
    for group in (("edp", "pp", "ep") if par.sharded_optimizer else ("pp", "ep")):
        if sizes[group] > 1:
            out[("all_reduce", group)] += 4


def _token_exchange(config: Config, abytes: int) -> float:
    """All-to-all bytes of one MoE layer and microbatch on a rank (alltoall dispatcher): the
    expert counts (int64), the routed rows out and their outputs back forward, both again
    backward. The rows a rank sends are exact (its tokens x top-k, dropless); those it receives
    depend on the router and are counted as many (balanced routing), so the sum over an ep
    group is exact while one rank's share is an expectation."""
    model, par = config.model, config.parallel
    tokens = config.train.micro_batch_size * model.seq_length // par.context_parallel_size
    if par.sequence_parallel:
        tokens //= par.tensor_model_parallel_size
    rows = tokens * model.moe_router_topk
    return 8 * model.num_experts + 4 * rows * model.hidden_size * abytes


def _embedding_partial(config: Config, rank: RankCoords) -> int:
    """Elements of the embedding's copies this rank holds (two under ZB-V, both ends of the V on
    rank 0) when the last stage has one too, whose grads sum over the embedding group."""
    par, model = config.parallel, config.model
    pp = par.pipeline_model_parallel_size
    if not (model.embedding_on_last_stage and pp > 1):
        return 0
    copies = sum(any(stage_ends(pp, par.vpp, rank.pp, c, par.v_shape)) for c in range(par.vpp))
    return (copies * model.padded_vocab_size(par.tensor_model_parallel_size) // par.tensor_model_parallel_size
            * model.hidden_size)


def _data_parallel(config: Config, rank: RankCoords, m: int, pbytes: int, out: Traffic) -> None:
    """The grad buffers' reduction, and the parameters' all-gather of the sharded strategies."""
    par = config.parallel
    for params in rank_params(config, rank.pp):
        for i, buf in enumerate(grad_buffers(config, params)):
            group = "edp" if i else "dp-cp"
            if buf.group_size == 1:
                continue
            for (start, end, _), sg, sp, gathers in zip(buf.buckets, buf.shard_grads, buf.shard_params, buf.gathers):
                size = end - start
                if not par.sharded_optimizer:
                    out[("all_reduce", group)] += 4 * size
                    continue
                out[("reduce_scatter", group)] += 4 * size * (m if sg else 1)
                # ZeRO-3 gathers a unit before its forward, and again before its backward, per microbatch.
                out[("all_gather", group)] += pbytes * size * (m * gathers if sp else 1)


def _muon(config: Config, rank: RankCoords, out: Traffic) -> None:
    """Muon's gathers of the momentum updates: over the data-parallel shards, then over tp."""
    par = config.parallel
    tp = par.tensor_model_parallel_size
    for params in rank_params(config, rank.pp):
        if tp > 1:
            out[("all_gather", "tp")] += sum(4 * p.numel * tp for p in params if p.matrix and p.tp_split)
        for i, buf in enumerate(grad_buffers(config, params)):
            if par.sharded_optimizer and buf.group_size > 1:
                out[("all_gather", "edp" if i else "dp-cp")] += sum(
                    4 * (end - start) for (start, end, _), members in zip(buf.buckets, buf.members)
                    if any(p.matrix for p in members))


def _parameter_server(config: Config, rank: RankCoords, pbytes: int, out: Traffic) -> None:
    """Workers send their grad buffers to the server, which sends back the grad norm and the parameters."""
    elements = sum(end - start for params in rank_params(config, rank.pp) for buf in grad_buffers(config, params)
                   for start, end, _ in buf.buckets)
    sent = step_bytes(4 * elements, pbytes * elements, config.parallel.data_parallel_size, server=rank.dp == 0)
    if sent:
        out[("send", "dp")] += sent


def wire_bytes(traffic: Traffic, group_sizes: dict[str, int]) -> Traffic:
    """What each rank sends with the ring algorithm, per (op, group)."""
    return {(op, group): ring_wire_bytes(op, group_sizes[group], nbytes) for (op, group), nbytes in traffic.items()}
