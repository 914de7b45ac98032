"""Model FLOPs, with Megatron-LM's formula (the device peaks of MFU: planner/hardware.py).

Per step, for global batch B, sequence s, L layers, hidden h, query groups g out of n heads of
width d (r = n*d/h, 1 unless --kv-channels widens the heads), MLP width f (times 3/2 when
gated), padded vocabulary V:

    FLOPs = 12 * B * s * L * h^2 * [ (1 + g/n + s/h) * r  +  (f/h) * gate  +  V / (2 * L * h) ]

The 12 is 2 FLOPs per multiply-add times 3 for forward + backward (the backward costs two
forwards). Term by term: QKV + output projections (1 + g/n), the attention scores and
weighted sum (s/h; the causal mask is not discounted, as in Megatron; on a layer with a sliding
window each query sees at most window + 1 keys, which stands for s, and where only some layers
slide the layers' mean does; under document masking (--reset-attention-mask) each query counts
its document's length as it would the sequence's, so the mean over queries, sum of L_d^2 / s
for documents of L_d tokens, stands for s: `document_keys`, which the training loop counts from
each step's batch and the planner takes as a stated mean document length), the MLP, and the
logits. For
g = n and f = 4h it is the classic 72*B*s*L*h^2*(1 + s/(6h) + V/(12*L*h)).
Multi-latent attention (--multi-latent-attention) replaces the attention term by its matmuls
counted whole: its projections' (planner/parameters.py: mla_linears) and per key the scores over
the query/key width (qk + pos channels) and the weighted sum over the value width, s * n * (d_qk +
d_v) multiply-adds per token. The kernel runs the weighted sum at the padded width (the wider of the
two, ModelConfig.attention_padded_head_dim), but its zero channels are no model work: MFU counts
the model's math, as Megatron-LM's MLA formula does; the step-time estimate counts what runs
(planner/compute.py).
Activation recomputation is not counted: MFU measures useful model work only. On a mixture-of-
experts layer the MLP term counts the active parameters only: k routed experts of width
f_moe and the shared expert, plus the router (E/2h) and the shared expert's gate (1/2h), so MFU
stays honest. Each multi-token prediction module (--mtp-num-layers) adds its layer, its
[embedding; hidden] projection 2h -> h (one more h^2 unit) and a second pass over the logits.

Muon's Newton-Schulz iterations (--optimizer muon) are optimizer work, not model FLOPs, so they
stay out of MFU and are counted apart: per logical matrix of m x n with m <= n (it iterates on
the wide side), each of the k steps multiplies X X^T (2 m^2 n), A A (2 m^3) and B X (2 m^2 n):
k * (4 m^2 n + 2 m^3) per step, once per matrix for the whole model; every tp rank of a matrix
computes it whole (optimizer/muon.py).
"""
from __future__ import annotations

from collections.abc import Iterable

from megatron_lite.config import ModelConfig, TrainConfig
from megatron_lite.planner.parameters import mla_linears


def flops_per_step(config: ModelConfig, global_batch_size: int, document_keys: float | None = None) -> float:
    """Model FLOPs of one optimizer step (forward + backward) over the whole global batch;
    `document_keys`: the keys per query of document-masked attention (None: no documents)."""
    h, s, layers = config.hidden_size, config.seq_length, config.num_layers
    gate = 1.5 if config.family == "llama" else 1.0
    heads_width = config.num_attention_heads * config.head_dim / h
    full = s if document_keys is None else min(s, document_keys)
    dense = config.ffn_hidden_size / h * gate
    moe = 0.0
    if config.num_experts:
        active = (config.moe_router_topk * config.expert_ffn_hidden_size
                  + (config.moe_shared_expert_intermediate_size or 0))
        # The router (one h x E matmul) and the shared expert's gate (h x 1).
        moe = active / h * gate + (config.num_experts + config.moe_shared_expert_gate) / (2 * h)

    # Multi-latent attention's projections: multiply-adds per token (module docstring).
    mla_projections = sum(w.rows * w.cols for w in mla_linears(config)) if config.multi_latent_attention else 0

    def layer(number: int) -> float:
        window = config.layer_window(number)
        keys = full if window is None else min(full, window + 1)
        if config.multi_latent_attention:
            per_key = config.num_attention_heads * (config.head_dim + config.value_head_dim)  # scores, weighted sum
            attention = (mla_projections + keys * per_key) / (2 * h * h)
        else:
            attention = (1 + config.num_query_groups / config.num_attention_heads + keys / h) * heads_width
        return attention + (moe if config.is_moe_layer(number) else dense)

    # Each multi-token prediction module: its layer (numbered after the model's), its 2h -> h
    # projection (4h^2 per token forward: 1 in these units) and the logits once more.
    depths = config.mtp_depths
    units = (sum(layer(number) for number in range(layers + depths)) + depths
             + (1 + depths) * config.padded_vocab_size() / (2 * h))
    return 12.0 * global_batch_size * s * h * h * units


def muon_matrices(config: ModelConfig, split_qkv: bool = True,
                  layers: Iterable[int] | None = None) -> list[tuple[int, int]]:
    """The full (rows, cols) of every logical matrix Muon orthogonalises in `layers` (default: the
    whole model, multi-token prediction modules included): query, key and value apart (or the
    fused QKV) and the output projection, or multi-latent attention's weights; SwiGLU's gate and
    up apart, fc2; on a mixture-of-experts layer the router, each expert's and the shared
    expert's; an MTP module's 2h -> h projection."""
    h, d = config.hidden_size, config.head_dim
    heads, groups = config.num_attention_heads * d, config.num_query_groups * d
    qkv = [(heads, h), (groups, h), (groups, h)] if split_qkv else [(heads + 2 * groups, h)]
    # Multi-latent attention's weights are matrices of their own, each orthogonalised whole.
    attention = ([(w.rows, w.cols) for w in mla_linears(config)] if config.multi_latent_attention
                 else qkv + [(h, heads)])
    gated = config.family == "llama"

    def mlp(ffn: int) -> list[tuple[int, int]]:
        return [(ffn, h)] * (2 if gated else 1) + [(h, ffn)]
    out = []
    for number in range(config.num_layers + config.mtp_depths) if layers is None else layers:
        # A multi-token prediction module (numbered after the model's layers) adds its 2h -> h projection.
        out += attention + ([(h, 2 * h)] if number >= config.num_layers else [])
        if config.is_moe_layer(number):
            out += [(config.num_experts, h)] + mlp(config.expert_ffn_hidden_size) * config.num_experts
            out += mlp(config.moe_shared_expert_intermediate_size) if config.moe_shared_expert_intermediate_size else []
        else:
            out += mlp(config.ffn_hidden_size)
    return out


def newton_schulz_flops(config: ModelConfig, train: TrainConfig) -> float:
    """Muon's Newton-Schulz FLOPs of one optimizer step, each matrix once (module docstring); 0 for AdamW."""
    if train.optimizer != "muon":
        return 0.0
    return sum(train.muon_num_ns_steps * (4 * min(r, c) ** 2 * max(r, c) + 2 * min(r, c) ** 3)
               for r, c in muon_matrices(config, train.muon_split_qkv))


def newton_schulz_gemms(rows: int, cols: int) -> list[tuple[int, int, int]]:
    """The (m, k, n) of one Newton-Schulz step's matmuls on a rows x cols matrix (module docstring)."""
    m, n = min(rows, cols), max(rows, cols)
    return [(m, n, m), (m, m, m), (m, m, n)]
