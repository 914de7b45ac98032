"""Multi-latent attention (MLA), DeepSeek-V2/V3's, with Megatron-Core's parameter names.

Keys and values come from one small latent per token: linear_kv_down_proj maps the hidden state to
the latent (--kv-lora-rank wide) and one rotated key part (--qk-pos-emb-head-dim wide, shared by all
heads), kv_layernorm normalises the latent (with --qk-layernorm), and linear_kv_up_proj expands it into
every head's unrotated key (--qk-head-dim) and value (--v-head-dim). Queries do the same through their
own latent (linear_q_down_proj, q_layernorm, linear_q_up_proj) with --q-lora-rank, or directly
(linear_q_proj). Each query and key head is [unrotated; rotated] channels; RoPE turns only the rotated
ones, with the model's tables at that width (YaRN from Megatron's --rotary-scaling-factor, --mscale and
--mscale-all-dim, whose mscale_all_dim term also scales the softmax).

Tensor parallelism: the down-projections are duplicated on every tp rank (they are narrow); the
up-projections are column-parallel over heads and linear_proj row-parallel, as in attention. Under
sequence parallelism the down-projections and latent norms see this rank's tokens, and the up-projections
gather the sequence; the shared rotated key enters the tp region the same way.

Attention itself is the model's (flash kernel, context parallelism, the KV cache), which takes one
width for q, k and v: the narrower of values and queries is padded with zeros, which changes no score
and no output channel that is kept (ModelConfig.attention_padded_head_dim).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lite.config import ModelConfig
from megatron_lite.model.attention import Attention
from megatron_lite.model.norms import build_norm
from megatron_lite.model.ops import Ops
from megatron_lite.tensor_parallel import (
    ColumnParallelLinear,
    DuplicatedLinear,
    RowParallelLinear,
    enter_tensor_parallel_region,
)
from megatron_lite.tensor_parallel.random import checkpointed


class MultiLatentAttention(Attention):
    """Causal self-attention whose keys, values (and queries) are up-projected from per-token latents."""

    def __init__(self, config: ModelConfig, ops: Ops, sequence_parallel: bool = False, layer_number: int = 0) -> None:
        super(Attention, self).__init__()  # not Attention's fused QKV: MLA has its own projections
        self._init_attention(config, ops, sequence_parallel, layer_number)
        h, heads, sp = config.hidden_size, config.num_attention_heads, sequence_parallel
        self.qk_head_dim, self.pos_dim, self.kv_lora_rank = (config.qk_head_dim, config.qk_pos_emb_head_dim,
                                                             config.kv_lora_rank)
        self.padded_dim, self.query_scale = config.attention_padded_head_dim, config.mla_query_scale
        self.linear_q_proj = self.linear_q_down_proj = self.linear_q_up_proj = self.q_layernorm = None
        if config.q_lora_rank is None:
            self.linear_q_proj = ColumnParallelLinear(h, heads * self.head_dim, bias=False, sequence_parallel=sp)
        else:
            self.linear_q_down_proj = DuplicatedLinear(h, config.q_lora_rank, sequence_parallel=sp)
            if config.qk_layernorm:
                self.q_layernorm = build_norm(config, ops, sp, config.q_lora_rank)
            self.linear_q_up_proj = ColumnParallelLinear(config.q_lora_rank, heads * self.head_dim, bias=False,
                                                         sequence_parallel=sp)
        self.linear_kv_down_proj = DuplicatedLinear(h, self.kv_lora_rank + self.pos_dim, sequence_parallel=sp)
        self.kv_layernorm = build_norm(config, ops, sp, self.kv_lora_rank) if config.qk_layernorm else None
        kv_width = heads * (self.qk_head_dim + self.value_head_dim)  # per head: unrotated key, value
        self.linear_kv_up_proj = ColumnParallelLinear(self.kv_lora_rank, kv_width, bias=False, sequence_parallel=sp)
        self.linear_proj = RowParallelLinear(heads * self.value_head_dim, h, bias=False, sequence_parallel=sp)

    def project(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's heads' q, k and v [b, s, heads, padded width] of x (this rank's tokens under SP)."""
        if self.linear_q_proj is None:
            q_in = self.linear_q_down_proj(x)
            if self.q_layernorm is not None:
                q_in = self.q_layernorm(q_in)
        else:
            q_in = x
        latent, k_pos = self.linear_kv_down_proj(x).split([self.kv_lora_rank, self.pos_dim], dim=-1)
        if self.kv_layernorm is not None:
            latent = self.kv_layernorm(latent)
        up = checkpointed(self._up_project, "mla_up_proj" in self.recompute)
        return up(q_in, latent, k_pos, *(rotary or ()))

    def _up_project(self, q_in: torch.Tensor, latent: torch.Tensor, k_pos: torch.Tensor,
                    cos: torch.Tensor | None = None, sin: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The heads from the latents, RoPE on their rotated parts, the softmax scale folded into q, and the
        padding to one width (Megatron's mla_up_proj: what --recompute-modules mla_up_proj replays)."""
        q = (self.linear_q_proj or self.linear_q_up_proj)(q_in)
        kv = self.linear_kv_up_proj(latent)
        b, s, _ = q.shape  # the full sequence, also under SP
        q_nope, q_pos = q.view(b, s, self.num_heads, self.head_dim).split([self.qk_head_dim, self.pos_dim], dim=-1)
        k_nope, v = kv.view(b, s, self.num_heads, -1).split([self.qk_head_dim, self.value_head_dim], dim=-1)
        # The rotated key part is one per token for all heads: each rank's heads add to its grad.
        k_pos = enter_tensor_parallel_region(k_pos, self.sequence_parallel).unsqueeze(2)
        if cos is not None:
            q_pos, k_pos = self.ops.apply_rotary(q_pos.contiguous(), k_pos.contiguous(), cos, sin)
        q = torch.cat((q_nope, q_pos), dim=-1) * self.query_scale
        k = torch.cat((k_nope, k_pos.expand(b, s, self.num_heads, self.pos_dim)), dim=-1)
        pad = self.padded_dim - self.head_dim
        q, k = (F.pad(q, (0, pad)), F.pad(k, (0, pad))) if pad else (q, k)
        return q, k, F.pad(v, (0, self.padded_dim - self.value_head_dim))
