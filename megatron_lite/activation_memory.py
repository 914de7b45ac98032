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
(s·d elements). Per rank, the layers of its pipeline stage(s), times the microbatches in
flight (the pipeline schedule's).

Recomputation replaces the terms of what it replays by the inputs it keeps:
  full       only each group's input, h/t_s per token per group (uniform: ceil(L/N) groups;
             block: N layers replayed, the other L - N as above)
  layernorm  2h/t_s instead of the norms' terms
  core_attn  q, k, v and the output: (2·a·d + 2·g·d)/t instead of attention's term
  mlp        the MLP's input, h/t_s, instead of the fc1 input's h and the MLP's term
Not modelled: dropout (its masks, and with attention dropout the s x s probabilities of
torch's math attention), mixture-of-experts layers, q/k norms, and --bf16 (most tensors take 2 bytes
there, the norms' fp32 statistics 4). tests/test_activation_memory.py measures the saved
tensors with saved-tensor hooks against this formula.
"""
from __future__ import annotations

import math

from megatron_lite.model_config import ModelConfig

BYTES = 4  # fp32


def layer_bytes(model: ModelConfig, micro_batch: int, tp: int = 1, sequence_parallel: bool = False) -> float:
    """Bytes one dense layer keeps for backward with the selective setting of `model` (none if unset)."""
    h, a, g, d, f = (model.hidden_size, model.num_attention_heads, model.num_query_groups, model.head_dim,
                     model.ffn_hidden_size)
    ts = tp if sequence_parallel else 1
    recompute = model.selective_recompute
    llama = model.family == "llama"
    norm = (2 * h + 1 if llama else h + 2) if "layernorm" not in recompute else h
    attention = (2 * a * d + 2 * g * d if "core_attn" in recompute else (4 if llama else 6) * a * d + a) / tp
    mlp = h / ts if "mlp" in recompute else h + (4 if llama else 2) * f / tp
    per_token = 2 * norm / ts + h + attention + mlp
    return BYTES * model.seq_length * micro_batch * per_token


def stage_bytes(model: ModelConfig, layers: int, micro_batch: int, tp: int = 1, sequence_parallel: bool = False) -> float:
    """Bytes `layers` consecutive layers of one model chunk keep per microbatch (with full
    recomputation: the kept inputs of the replayed layers), RoPE tables included."""
    tokens = model.seq_length * micro_batch
    layer_input = BYTES * tokens * model.hidden_size / (tp if sequence_parallel else 1)
    kept = layer_bytes(model, micro_batch, tp, sequence_parallel)
    if model.recompute_granularity == "full" and model.recompute_method == "uniform":
        return math.ceil(layers / (model.recompute_num_layers or 1)) * layer_input
    replayed = min(model.recompute_num_layers, layers) if model.recompute_granularity == "full" else 0
    rope = BYTES * model.seq_length * model.head_dim if model.family == "llama" else 0
    return replayed * layer_input + (layers - replayed) * kept + (rope if layers > replayed else 0)


def describe_activation_memory(model: ModelConfig, layers_per_chunk: int, chunks: int, micro_batch: int,
                               tp: int, sequence_parallel: bool) -> str:
    """The start-up log line: the formula's bytes per microbatch on this rank."""
    per_chunk = stage_bytes(model, layers_per_chunk, micro_batch, tp, sequence_parallel)
    setting = model.recompute_granularity or "no"
    if model.recompute_granularity == "full":
        setting += f" ({model.recompute_method}, {model.recompute_num_layers or 1})"
    elif model.recompute_granularity == "selective":
        setting += f" ({' '.join(model.selective_recompute)})"
    caveats = [why for bad, why in ((model.num_experts, "MoE layers"), (model.qk_layernorm, "q/k norms"),
                                    (model.hidden_dropout or model.attention_dropout, "dropout")) if bad]
    return (f"> activations: {chunks * per_chunk / 2**20:.2f} MB per microbatch on this rank ({chunks} x "
            f"{layers_per_chunk} layers, {setting} recomputation; fp32 formula of megatron_lite/activation_memory.py"
            + (f", not counting {' and '.join(caveats)}" if caveats else "") + ")")
