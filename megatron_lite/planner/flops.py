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
Activation recomputation is not counted: MFU measures useful model work only. On a mixture-of-
experts layer the MLP term counts the active parameters only: k routed experts of width
f_moe and the shared expert, plus the router (E/2h) and the shared expert's gate (1/2h), so MFU
stays honest.
"""
from __future__ import annotations

from megatron_lite.config import ModelConfig


def flops_per_step(config: ModelConfig, global_batch_size: int, document_keys: float | None = None) -> float:
    """Model FLOPs of one optimizer step (forward + backward) over the whole global batch;
    `document_keys`: the keys per query of document-masked attention (None: no documents)."""
    h, s, layers = config.hidden_size, config.seq_length, config.num_layers
    gate = 1.5 if config.family == "llama" else 1.0
    heads_width = config.num_attention_heads * config.head_dim / h
    full = s if document_keys is None else min(s, document_keys)
    keys = sum(full if window is None else min(full, window + 1) for window in config.layer_windows) / layers
    attention = (1 + config.num_query_groups / config.num_attention_heads + keys / h) * heads_width
    dense = config.ffn_hidden_size / h * gate
    moe_layers = sum(config.is_moe_layer(i) for i in range(layers))
    moe = 0.0
    if moe_layers:
        active = (config.moe_router_topk * config.expert_ffn_hidden_size
                  + (config.moe_shared_expert_intermediate_size or 0))
        # The router (one h x E matmul) and the shared expert's gate (h x 1).
        moe = active / h * gate + (config.num_experts + config.moe_shared_expert_gate) / (2 * h)
    mlp = ((layers - moe_layers) * dense + moe_layers * moe) / layers
    logits = config.padded_vocab_size() / (2 * layers * h)
    return 12.0 * global_batch_size * s * layers * h * h * (attention + mlp + logits)
