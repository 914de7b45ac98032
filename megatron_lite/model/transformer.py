"""One pre-norm transformer layer: attention and MLP, each a residual branch.

Layer and parameter names follow Megatron-Core (self_attention, linear_fc1, linear_fc2). Tensor
parallelism lives entirely in the layer classes: fc1 is column-parallel, fc2 (which writes back to
the residual stream) row-parallel, and each rank runs ffn/tp MLP channels; attention (attention.py,
or multi-latent attention in mla.py) splits its heads the same way. With sequence parallelism the
layer's input and output hold seq/tp tokens; the linears gather and scatter them.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.model.attention import Attention
from megatron_lite.model.kv_cache import InferenceParams
from megatron_lite.model.mla import MultiLatentAttention
from megatron_lite.model.moe import MoELayer
from megatron_lite.model.norms import build_norm
from megatron_lite.model.ops import Ops
from megatron_lite.optimizer.muon import mark_row_blocks
from megatron_lite.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_lite.tensor_parallel.random import checkpointed


class MLP(nn.Module):
    """SwiGLU (llama: fc1 holds [gate; up]) or GELU (gpt2) feed-forward block."""

    def __init__(self, config: ModelConfig, ops: Ops, sequence_parallel: bool = False,
                 ffn_hidden_size: int | None = None) -> None:
        super().__init__()
        gated = config.family == "llama"
        bias = not gated
        ffn = ffn_hidden_size or config.ffn_hidden_size
        fc1_out = ffn * (2 if gated else 1)
        # stride 2: each rank takes its slice of the gate half and of the up half.
        self.linear_fc1 = ColumnParallelLinear(config.hidden_size, fc1_out, bias=bias,
                                               sequence_parallel=sequence_parallel, stride=2 if gated else 1)
        if gated:  # two matrices to Muon
            mark_row_blocks(self.linear_fc1.weight, 1, (ffn, ffn))
        self.linear_fc2 = RowParallelLinear(ffn, config.hidden_size, bias=bias,
                                            sequence_parallel=sequence_parallel)
        self.activation = ops.swiglu if gated else ops.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.activation(self.linear_fc1(x)))


class TransformerLayer(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)), computed by the model's `ops`; the MLP is a
    mixture of experts on the layers ModelConfig.is_moe_layer names."""

    def __init__(self, config: ModelConfig, ops: Ops, sequence_parallel: bool = False, number: int = 0) -> None:
        super().__init__()
        self.input_layernorm = build_norm(config, ops, sequence_parallel)
        attention = MultiLatentAttention if config.multi_latent_attention else Attention
        self.self_attention = attention(config, ops, sequence_parallel, number)
        self.pre_mlp_layernorm = build_norm(config, ops, sequence_parallel)
        if config.is_moe_layer(number):
            shared = config.moe_shared_expert_intermediate_size
            self.mlp = MoELayer(config, ops, sequence_parallel,
                                MLP(config, ops, sequence_parallel, shared) if shared else None)
        else:
            self.mlp = MLP(config, ops, sequence_parallel)
        self.dropout = nn.Dropout(config.hidden_dropout)
        # Selective recomputation: which of this layer's parts backward replays.
        recompute = config.selective_recompute
        self.recompute_norms = "layernorm" in recompute
        self.recompute_mlp = ("moe" if config.is_moe_layer(number) else "mlp") in recompute

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                inference_params: InferenceParams | None = None, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        input_norm = checkpointed(self.input_layernorm, self.recompute_norms)
        attn = self.dropout(self.self_attention(input_norm(x), rotary, inference_params, doc_start))
        # The residual add and the MLP's norm in one op (one pass in the fused kernel). The
        # stream x goes first: the sum takes its dtype, fp32 under autocast.
        normed, x = checkpointed(self.pre_mlp_layernorm, self.recompute_norms)(x, attn)
        return x + self.dropout(checkpointed(self.mlp, self.recompute_mlp)(normed))
