"""Multi-latent attention's checks and derived values: a base of ModelConfig, which holds the fields."""
from __future__ import annotations

import math

from megatron_lite.config.checks import require, require_positive


def yarn_mscale(factor: float, weight: float) -> float:
    """YaRN's attention temperature term 0.1 * weight * ln(factor) + 1 (1 where the context is not extended)."""
    return 1.0 if factor <= 1 else 0.1 * weight * math.log(factor) + 1.0


class MLAChecks:
    """The --multi-latent-attention checks and the softmax scale, on ModelConfig's fields."""

    @property
    def attention_padded_head_dim(self) -> int:
        """The head width attention runs at: the query/key width, or MLA's value width where that is wider. MLA pads
        the narrower of the two with zeros, which changes neither the scores nor the output (the kernels and
        context parallelism take one head width for q, k and v)."""
        return max(self.head_dim, self.value_head_dim)

    @property
    def mla_query_scale(self) -> float:
        """What MLA multiplies its queries by so that attention's 1/sqrt(padded width) makes the softmax scale
        Megatron's and DeepSeek's: 1/sqrt(qk width), times yarn_mscale(factor, mscale_all_dim)^2 under YaRN."""
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.rope_scaling_type == "yarn":
            scale *= yarn_mscale(self.rope_scaling_factor, self.rope_scaling_mscale_all_dim or 0.0) ** 2
        return scale * math.sqrt(self.attention_padded_head_dim)

    def _validate_mla(self) -> None:
        require(self.family == "llama", f"--multi-latent-attention is for the llama family (RMSNorm, RoPE, SwiGLU); "
                                        f"--family={self.family} is not supported with it")
        require_positive(self, "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
        if self.q_lora_rank is not None:
            require_positive(self, "q_lora_rank")
        require(self.qk_pos_emb_head_dim % 2 == 0,
                f"--qk-pos-emb-head-dim={self.qk_pos_emb_head_dim} must be even (RoPE rotates pairs)")
        require(self.num_query_groups == self.num_attention_heads,
                f"--num-query-groups={self.num_query_groups} with --multi-latent-attention: MLA gives every one of "
                f"the --num-attention-heads={self.num_attention_heads} heads its own key and value; drop "
                "--num-query-groups")
        require(not self.add_qkv_bias, "--add-qkv-bias with --multi-latent-attention is not supported (MLA's "
                                       "projections have no bias)")
        require(self.rotary_percent == 1.0, f"--rotary-percent={self.rotary_percent} with --multi-latent-attention: "
                "MLA rotates all --qk-pos-emb-head-dim channels and none of the others; drop --rotary-percent")
