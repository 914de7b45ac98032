"""The activation bytes a transformer layer keeps for backward, by formula: Korthikanti et al.
(2022) adapted to our blocks, for each recomputation setting.

Korthikanti's GPT layer in fp16 keeps s·b·h·(34 + 5·a·s/h) bytes (its softmax and dropout
masks are the 5·a·s/h). Ours, counted tensor by tensor in fp32 (4 bytes per element), per
token of the microbatch (s·b tokens), with t = tp, t_s = t under sequence parallelism else 1,
a/g query/kv heads of width d, f the MLP width, and attention that keeps no s x s matrix
(flash attention, and torch's SDPA without dropout):

    llama  2·(2h + 1)/t_s  +  2h  +  (4·a·d + a)/t  +  4·f/t
    gpt2   2·(h + 2)/t_s   +  2h  +  (6·a·d + a)/t  +  2·f/t

Term by term: the two norms (RMSNorm: its input, the normalised input and 1/rms; LayerNorm:
its input, mean and 1/std) on this rank's tokens; the inputs of the QKV and fc1 linears,
which see the whole sequence (under SP they keep the all-gathered input: Megatron re-gathers
it in backward instead, for h/t each); attention's q, k and v (k and v repeated to every
query head: GQA saves no memory here), its output and log-sum-exp (gpt2's k and v are views
of the fused QKV output, which it keeps whole); the MLP's fc1 output, its activation (SwiGLU:
silu of the gate too) and the fc2 input. Llama adds the RoPE tables once per microbatch
(s·d elements; b·s·d under --reset-position-ids, each sample its own positions). Per rank,
the layers of its pipeline stage(s), times the microbatches in flight (the pipeline schedule's).

Recomputation replaces the terms of what it replays by the inputs it keeps:
  full       only each group's input, h/t_s per token per group (uniform: ceil(L/N) groups;
             block: N layers replayed, the other L - N as above)
  layernorm  2h/t_s instead of the norms' terms
  core_attn  q, k, v and the output: (2·a·d + 2·g·d)/t instead of attention's term
  mlp        the MLP's input, h/t_s, instead of the fc1 input's h and the MLP's term
Context parallelism (on s/cp tokens per rank) and q/k norms (llama) change the attention
term: see layer_bytes. Multi-latent attention (model/mla.py) keeps q, k and v at the padded width
D (ModelConfig.attention_padded_head_dim), the output, its log-sum-exp and the output projection's
input (v wide where it is a copy): 4·a·D + a (+ a·v) per token over t, core_attn 3·a·D + a·v; in
place of the QKV input's h, its latents' terms (_mla_inputs: the down-projections' input on this
rank's tokens, the latent norms', the up-projections' gathered inputs). mla_up_proj recomputation
keeps the up-projections' inputs of this rank's tokens only (its replay gathers them again).
Outside the layers: embedding_bytes (first stage), head_bytes (last, with the multi-token
prediction modules).
Document masking (--reset-attention-mask) computes fewer score blocks but keeps nothing more in
a layer: the flash kernel keeps only the microbatch's [b, s] document starts, shared by every
layer (the FLOPs and the attention time do shrink: planner/flops.py, planner/compute.py).
Not modelled: dropout (its masks, and with attention dropout the s x s probabilities of
torch's math attention), the fp32 [b, s, s] mask torch's SDPA keeps per layer on the plain-torch
path under --reset-attention-mask, mixture-of-experts layers, and --bf16 (most tensors take 2 bytes
there, the norms' fp32 statistics and the fp32 residual stream 4). tests/test_activation_memory.py
measures the layers' saved tensors with saved-tensor hooks against this formula, and
tests/test_planner.py whole steps of its dense layouts (the planner's peak: megatron_lite/planner/memory.py).
"""
from __future__ import annotations

import math
import weakref

import torch

from megatron_lite.config.model_config import ModelConfig

BYTES = 4  # fp32


def layer_bytes(model: ModelConfig, micro_batch: int, tp: int = 1, sequence_parallel: bool = False,
                cp_comm: str | None = None) -> float:
    """Bytes one dense layer keeps for backward with the selective setting of `model` (none if unset).
    `cp_comm`: the context-parallel attention in use (None: cp 1). p2p and allgather keep this
    rank's q, its k unrepeated, the fused QKV output (v is a view of it), the output and the
    log-sum-exp, and the output projection's input apart (the merged output is head-major, so
    its [b, s, a·d] view is a copy): (4a + 3g)·d + a per token for llama (k after RoPE is a
    tensor of its own), (3a + 2g)·d + a for gpt2. a2a (Ulysses) keeps q, k and v as exchanged
    (a/cp heads of the whole sequence: a·d per token each), the output, the projection's input
    and the log-sum-exp, 5·a·d + a, and two int64 token indices of the exchange."""
    h, a, g, d, f = (model.hidden_size, model.num_attention_heads, model.num_query_groups, model.head_dim,
                     model.ffn_hidden_size)
    ts = tp if sequence_parallel else 1
    recompute = model.selective_recompute
    llama = model.family == "llama"
    norm = (2 * h + 1 if llama else h + 2) if "layernorm" not in recompute else h
    inputs = h  # the QKV linear's input
    if model.multi_latent_attention:
        inputs = _mla_inputs(model, ts)
        wide, v = model.attention_padded_head_dim, model.value_head_dim
        # q, k and v at the padded width (tensors of their own), the output and its log-sum-exp, and the output
        # projection's input: each head's v channels, a copy where the padding is cut off or the output is
        # head-major (context parallelism, as above), else a view of the output.
        attention = (3 * a * wide + a * v if "core_attn" in recompute else
                     4 * a * wide + a + (a * v if v < wide or cp_comm else 0))
    elif "core_attn" in recompute:
        attention = 2 * a * d + 2 * g * d
    elif cp_comm in ("p2p", "allgather"):
        attention = ((4 * a + 3 * g) if llama else (3 * a + 2 * g)) * d + a
    elif cp_comm == "a2a":
        attention = 5 * a * d + a
    else:
        attention = (4 if llama else 6) * a * d + a
    if model.qk_layernorm and not model.multi_latent_attention:  # MLA's norms are its latents' (_mla_inputs)
        # The q and k RMSNorms' inputs and 1/rms, and the normalised q (RoPE's input; k's is kept
        # as k already): (2a + g)·d + a + g. (Models with q/k norms are of the llama family.)
        attention += (2 * a + g) * d + a + g
    attention = attention / tp + (4 if cp_comm == "a2a" and "core_attn" not in recompute else 0)
    mlp = h / ts if "mlp" in recompute else h + (4 if llama else 2) * f / tp
    per_token = 2 * norm / ts + inputs + attention + mlp
    return BYTES * model.seq_length * micro_batch * per_token


def _mla_inputs(model: ModelConfig, ts: int) -> float:
    """Elements per token multi-latent attention keeps before its heads (model/mla.py): the down-projections'
    input (this rank's tokens; linear_q_proj's, without --q-lora-rank, gathered under SP), the latent norms'
    input, 1/rms and normalised latent, and the up-projections' inputs: the latents, gathered under SP, where
    mla_up_proj recomputation keeps this rank's instead (its replay gathers them again). The kv down-projection's
    output [latent; rotated key] is kept whole wherever a view of it is: by its norm, or by an up-projection or
    the replay reading this rank's tokens."""
    h, rq, kv, pos = model.hidden_size, model.q_lora_rank, model.kv_lora_rank, model.qk_pos_emb_head_dim
    norm = model.qk_layernorm
    up = ts if "mla_up_proj" in model.selective_recompute else 1  # the up-projections' inputs: tokens / up
    kept = h / ts + (h if rq is None and up < ts else 0)
    if rq is not None:
        kept += ((2 * rq + 1) / ts if norm else 0) + rq / up
    if norm:
        return kept + (kv + pos + kv + 1) / ts + kv / up
    return kept + ((kv + pos) / ts if up == ts else kv)


def stage_bytes(model: ModelConfig, layers: int, micro_batch: int, tp: int = 1, sequence_parallel: bool = False,
                cp_comm: str | None = None, per_sample_positions: bool = False) -> float:
    """Bytes `layers` consecutive layers of one model chunk keep per microbatch (with full
    recomputation: the kept inputs of the replayed layers), RoPE tables included (one per sample
    with `per_sample_positions`, --reset-position-ids)."""
    tokens = model.seq_length * micro_batch
    layer_input = BYTES * tokens * model.hidden_size / (tp if sequence_parallel else 1)
    kept = layer_bytes(model, micro_batch, tp, sequence_parallel, cp_comm)
    if model.recompute_granularity == "full" and model.recompute_method == "uniform":
        return math.ceil(layers / (model.recompute_num_layers or 1)) * layer_input
    replayed = min(model.recompute_num_layers, layers) if model.recompute_granularity == "full" else 0
    tables = micro_batch if per_sample_positions else 1
    rope = BYTES * tables * model.seq_length * model.rotary_dim if model.family == "llama" else 0
    return replayed * layer_input + (layers - replayed) * kept + (rope if layers > replayed else 0)


def embedding_bytes(model: ModelConfig, micro_batch: int) -> float:
    """Bytes the first stage keeps per microbatch outside the layers: the token ids (int64) and
    the embedding's mask of ids outside this rank's vocabulary shard (bool); gpt2's position ids."""
    tokens = model.seq_length * micro_batch
    return 9 * tokens + (8 * model.seq_length if model.family == "gpt2" else 0)


def head_bytes(model: ModelConfig, micro_batch: int, tp: int = 1, sequence_parallel: bool = False,
               logits_kept: bool = True, cp_comm: str | None = None) -> float:
    """Bytes the last stage keeps per microbatch after the layers: the final norm's (as in
    layer_bytes, on this rank's tokens), the output layer's input (the whole sequence), and the
    vocab-parallel loss's: with the plain loss the fp32 logits shard and its softmax (V/t each),
    the labels twice (int64) and 10 bytes of masks and statistics per token, plus the pad
    columns' mask; the fused loss kernel keeps no logits (`logits_kept` False). Each multi-token
    prediction module keeps as much again for its final norm, head and loss, and besides its
    layer's (layer_bytes, `cp_comm` as there), its embedding's ids and mask, its two input
    norms' and its projection's input [embedding; hidden] (the whole sequence under SP)."""
    h, depths = model.hidden_size, model.mtp_depths
    tokens = model.seq_length * micro_batch
    ts = tp if sequence_parallel else 1
    norm = 2 * h + 1 if model.family == "llama" else h + 2
    module = (embedding_bytes(model, micro_batch) + BYTES * tokens * (2 * norm / ts + 2 * h)
              + layer_bytes(model, micro_batch, tp, sequence_parallel, cp_comm)) if depths else 0.0
    return (1 + depths) * BYTES * tokens * (norm / ts + h) + depths * module + loss_bytes(model, micro_batch, tp,
                                                                                        logits_kept)


def loss_bytes(model: ModelConfig, micro_batch: int, tp: int = 1, logits_kept: bool = True) -> float:
    """The loss's part of head_bytes (the lm loss's and each MTP module's): what only the input
    gradient's pass reads, so a split backward (zero-bubble schedules) frees it at B, the rest of
    the head at W."""
    v = model.padded_vocab_size(tp) // tp
    return (1 + model.mtp_depths) * ((8 * v + 26) * model.seq_length * micro_batch + v) if logits_kept else 0


def describe_activation_memory(model: ModelConfig, layers_per_chunk: int, chunks: int, micro_batch: int,
                               tp: int, sequence_parallel: bool, per_sample_positions: bool = False) -> str:
    """The start-up log line: the formula's bytes per microbatch on this rank."""
    per_chunk = stage_bytes(model, layers_per_chunk, micro_batch, tp, sequence_parallel,
                            per_sample_positions=per_sample_positions)
    setting = model.recompute_granularity or "no"
    if model.recompute_granularity == "full":
        setting += f" ({model.recompute_method}, {model.recompute_num_layers or 1})"
    elif model.recompute_granularity == "selective":
        setting += f" ({' '.join(model.selective_recompute)})"
    caveats = [why for bad, why in ((model.num_experts, "MoE layers"),
                                    (model.hidden_dropout or model.attention_dropout, "dropout")) if bad]
    return (f"> activations: {chunks * per_chunk / 2**20:.2f} MB per microbatch on this rank ({chunks} x "
            f"{layers_per_chunk} layers, {setting} recomputation; "
            "fp32 formula of megatron_lite/planner/activation_memory.py"
            + (f", not counting {' and '.join(caveats)}" if caveats else "") + ")")


class SavedTensorMeter:
    """Live bytes of the tensors autograd saves for backward, and their peak, measured with
    saved-tensor hooks (`with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack)`):
    what the formula predicts, counted from what autograd actually keeps. Each storage counts
    once while any saved tensor holds it; the model's parameters (whose storage a linear saves
    for its backward, and ZeRO-3's gathered buckets) are not activations and do not count."""

    def __init__(self, params: list[torch.Tensor] | None = None) -> None:
        self.params = list(params or [])
        self.live = self.peak = 0
        self._holders: dict[int, int] = {}  # storage address -> saved tensors holding it

    def pack(self, t: torch.Tensor) -> object:
        holder = type("Saved", (), {})()
        # Detached: an op that saves its own output (rsqrt, softmax) would otherwise have the
        # holder keep the output, the output its grad_fn and that node the holder, a cycle that
        # outlives a graph kept for a second pass (retain_graph, the zero-bubble schedules' B).
        holder.tensor = t.detach()
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in {p.untyped_storage().data_ptr() for p in self.params} or storage.nbytes() == 0:
            return holder
        if key not in self._holders:
            self._holders[key] = 0
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._holders[key] += 1
        weakref.finalize(holder, self._release, key, storage.nbytes())  # runs when autograd drops it
        return holder

    def _release(self, key: int, nbytes: int) -> None:
        self._holders[key] -= 1
        if not self._holders[key]:
            del self._holders[key]
            self.live -= nbytes

    @staticmethod
    def unpack(holder: object) -> torch.Tensor:
        return holder.tensor
