"""One pre-norm transformer layer: attention and MLP, each a residual branch.

Layer and parameter names follow Megatron-Core (linear_qkv, linear_proj, linear_fc1,
linear_fc2). Tensor parallelism lives entirely in the layer classes: QKV and fc1 are
column-parallel, the projections that write back to the residual stream are row-parallel,
and each rank runs num_heads/tp heads and ffn/tp MLP channels. With sequence parallelism
the layer's input and output hold seq/tp tokens; the linears gather and scatter them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.config import ModelConfig
from megatron_lite.model.norms import build_norm
from megatron_lite.model.rope import apply_rotary
from megatron_lite.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads.

    The fused QKV projection is laid out group by group: for each query group its query
    heads, then its key head, then its value head. Splitting that output dimension into
    contiguous pieces therefore hands every tp rank whole groups (Megatron's layout too).
    """

    def __init__(self, config: ModelConfig, sequence_parallel: bool = False) -> None:
        super().__init__()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.num_heads = config.num_attention_heads // tp
        self.num_groups = config.num_query_groups // tp
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        bias = config.family == "gpt2"
        qkv_size = (config.num_attention_heads + 2 * config.num_query_groups) * self.head_dim
        self.linear_qkv = ColumnParallelLinear(config.hidden_size, qkv_size, bias=bias,
                                               sequence_parallel=sequence_parallel)
        self.linear_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                             bias=bias, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        qkv = self.linear_qkv(x)
        b, s, _ = qkv.shape  # full sequence here, even under SP
        heads_per_group = self.num_heads // self.num_groups
        qkv = qkv.view(b, s, self.num_groups, heads_per_group + 2, self.head_dim)
        q = qkv[:, :, :, :heads_per_group].reshape(b, s, self.num_heads, self.head_dim)
        k, v = qkv[:, :, :, heads_per_group], qkv[:, :, :, heads_per_group + 1]
        if rotary is not None:
            cos, sin = rotary[0][:s], rotary[1][:s]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # SDPA wants [batch, heads, seq, dim]; each key/value head serves heads_per_group queries.
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k = k.repeat_interleave(heads_per_group, dim=1)
        v = v.repeat_interleave(heads_per_group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """SwiGLU (llama: fc1 holds [gate; up]) or GELU (gpt2) feed-forward block."""

    def __init__(self, config: ModelConfig, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.gated = config.family == "llama"
        bias = not self.gated
        fc1_out = config.ffn_hidden_size * (2 if self.gated else 1)
        # stride 2: each rank takes its slice of the gate half and of the up half.
        self.linear_fc1 = ColumnParallelLinear(config.hidden_size, fc1_out, bias=bias,
                                               sequence_parallel=sequence_parallel, stride=2 if self.gated else 1)
        self.linear_fc2 = RowParallelLinear(config.ffn_hidden_size, config.hidden_size, bias=bias,
                                            sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.linear_fc2(h)


class TransformerLayer(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, sequence_parallel: bool = False) -> None:
        super().__init__()
        eps = config.norm_epsilon
        self.input_layernorm = build_norm(config.family, config.hidden_size, eps, sequence_parallel)
        self.self_attention = Attention(config, sequence_parallel)
        self.pre_mlp_layernorm = build_norm(config.family, config.hidden_size, eps, sequence_parallel)
        self.mlp = MLP(config, sequence_parallel)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.dropout(self.self_attention(self.input_layernorm(x), rotary))
        return x + self.dropout(self.mlp(self.pre_mlp_layernorm(x)))
