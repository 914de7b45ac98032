"""Causal self-attention with grouped-query heads (Megatron-Core's SelfAttention: linear_qkv, linear_proj).

QKV is column-parallel and the output projection row-parallel: each tp rank runs num_heads/tp heads.
`Attention.forward` is the part every variant shares (recomputation, the KV cache, the core, the
output projection); `project` makes this rank's queries, keys and values, and multi-latent attention
(mla.py) overrides it.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.config import ModelConfig
from megatron_lite.model.kv_cache import InferenceParams
from megatron_lite.model.norms import build_norm
from megatron_lite.model.ops import Ops
from megatron_lite.model.rope import apply_rope
from megatron_lite.optimizer.muon import mark_row_blocks
from megatron_lite.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_lite.tensor_parallel.random import checkpointed, get_rng_tracker


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads.

    The fused QKV projection is laid out group by group: for each query group its query
    heads, then its key head, then its value head. Splitting that output dimension into
    contiguous pieces therefore hands every tp rank whole groups (Megatron's layout too).
    With a window (ModelConfig.layer_window: --window-size on the layers --window-attn-skip-freq
    leaves sliding) each query sees itself and the window's tokens before it (Mistral's sliding
    window, less one); the layer hands it to every attention it runs (training, context
    parallelism, the KV cache), and so it does the document mask (`doc_start`, packed samples under
    --reset-attention-mask: each token's document start). With qk_layernorm every query and key
    head is normalised over its width before RoPE, by one norm for all query heads and one for all key heads (Megatron's
    q_layernorm, k_layernorm); each tp rank normalises its own heads, so their grads are partial
    over tp.
    """

    def __init__(self, config: ModelConfig, ops: Ops, sequence_parallel: bool = False, layer_number: int = 0) -> None:
        super().__init__()
        self._init_attention(config, ops, sequence_parallel, layer_number)
        tp = parallel_state.get_grid().size("tp")
        self.num_groups = config.num_query_groups // tp
        bias = config.family == "gpt2"
        qkv_size = (config.num_attention_heads + 2 * config.num_query_groups) * self.head_dim
        self.linear_qkv = ColumnParallelLinear(config.hidden_size, qkv_size, bias=bias or config.add_qkv_bias,
                                               sequence_parallel=sequence_parallel)
        heads_per_group = config.num_attention_heads // config.num_query_groups  # rows: per group, q heads, k, v
        mark_row_blocks(self.linear_qkv.weight, config.num_query_groups,
                        (heads_per_group * self.head_dim, self.head_dim, self.head_dim), qkv=True)
        self.linear_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                             bias=bias, sequence_parallel=sequence_parallel)
        self.q_layernorm = self.k_layernorm = None
        if config.qk_layernorm:
            self.q_layernorm = build_norm(config, ops, tp > 1, self.head_dim)
            self.k_layernorm = build_norm(config, ops, tp > 1, self.head_dim)

    def _init_attention(self, config: ModelConfig, ops: Ops, sequence_parallel: bool, layer_number: int) -> None:
        """What every attention variant keeps: its heads, widths, window, recomputation and ops."""
        self.layer_number = layer_number  # which entry of a generation's KV cache is this layer's
        self.num_heads = config.num_attention_heads // parallel_state.get_grid().size("tp")
        self.head_dim, self.value_head_dim = config.head_dim, config.value_head_dim
        self.dropout = config.attention_dropout
        self.window = config.layer_window(layer_number)
        self.sequence_parallel, self.recompute = sequence_parallel, config.selective_recompute
        self.ops = ops

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                inference_params: InferenceParams | None = None, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        """`inference_params`: generation's KV cache; x then holds the tokens after the cached ones.
        `doc_start` [b, s]: where each token's document starts in the sequence (None: no document mask)."""
        q, k, v = self.project(x, rotary)
        b, s = q.shape[:2]  # full sequence here, even under SP
        if "core_attn" in self.recompute:
            # What the replay keeps are its inputs: q, k and v of their own, not views that
            # would keep the whole fused QKV output alive.
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        # Attention takes [batch, heads, seq, dim].
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if inference_params is not None:
            out = inference_params.attend(self.layer_number, q, k, v, self.window, doc_start)
        else:
            out = checkpointed(self._core_attention, "core_attn" in self.recompute)(q, k, v, doc_start)
        # Each head's value width (MLA pads its values to the query width for attention).
        out = out.transpose(1, 2)[..., :self.value_head_dim]
        return self.linear_proj(out.reshape(b, s, -1))

    def project(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's q [b, s, heads, d] and k, v [b, s, groups, d] of x, after RoPE."""
        qkv = self.linear_qkv(x)
        b, s, _ = qkv.shape  # full sequence here, even under SP
        heads_per_group = self.num_heads // self.num_groups
        qkv = qkv.view(b, s, self.num_groups, heads_per_group + 2, self.head_dim)
        q = qkv[:, :, :, :heads_per_group].reshape(b, s, self.num_heads, self.head_dim)
        k, v = qkv[:, :, :, heads_per_group], qkv[:, :, :, heads_per_group + 1]
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if rotary is not None:
            q, k = apply_rope(self.ops.apply_rotary, q, k, *rotary)
        return q, k, v

    def _core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        doc_start: torch.Tensor | None) -> torch.Tensor:
        """Softmax(q k^T) v with dropout on this rank's heads: drawn from the tensor-parallel RNG
        (under SP the whole layer stack already is, see tensor_parallel/random.py)."""
        dropout = self.dropout if self.training else 0.0
        with get_rng_tracker().fork() if dropout and not self.sequence_parallel else contextlib.nullcontext():
            return self.ops.attention(q, k, v, dropout, self.window, doc_start)
