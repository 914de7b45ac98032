"""Rotary position embedding in the Hugging Face Llama ("rotate half") convention: the tables
here; the rotation is `Ops.apply_rotary` (the kernel or `megatron_lite.kernels.reference.apply_rotary_reference`).

The two halves of each head are rotated as pairs (x[i], x[i + d/2]); using that convention
(rather than Meta's interleaved pairs) lets checkpoints map onto LlamaForCausalLM unchanged.

RoPE scaling (--rope-scaling-type) changes each pair's frequency, and yarn also scales cos and
sin, as transformers' rope types of the same names do (modeling_rope_utils): a checkpoint of
Llama 3.1 or a YaRN-extended Qwen computes here what it computes there.

With --rotary-percent below 1 (Megatron's partial RoPE) only each head's first rotary_dim
channels are rotated, as a head of that width (its pairs, its frequencies); the rest pass through.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from megatron_lite.config.mla_checks import yarn_mscale
from megatron_lite.config.model_config import ModelConfig


def rotary_tables(model: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, each [context_length, rotary_dim // 2] in fp32,
    times the attention factor (1 but for yarn). fp64 until then, so long contexts keep their
    angles exact."""
    inv_freq, attention_factor = inverse_frequencies(model)
    angles = torch.outer(torch.arange(model.context_length, dtype=torch.float64), inv_freq)
    return (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()


def inverse_frequencies(model: ModelConfig) -> tuple[torch.Tensor, float]:
    """Each pair's angle per position (fp64, [rotary_dim // 2]) and the factor cos and sin are scaled by."""
    dim = model.rotary_dim
    inv_freq = 1.0 / (model.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    kind, factor = model.rope_scaling_type, model.rope_scaling_factor
    if kind == "none":
        return inv_freq, 1.0
    if kind == "linear":  # positions divided by the factor, which is the same as the frequencies
        return inv_freq / factor, 1.0
    original = model.rope_scaling_original_max_position_embeddings
    if kind == "llama3":
        # How far each pair is from "turns often within the original context" (1: keep it) to
        # "turns less than once" (0: slow it down by the factor), linear in 1 / wavelength.
        low, high = model.rope_scaling_low_freq_factor, model.rope_scaling_high_freq_factor
        turns = original * inv_freq / (2 * math.pi)
        keep = ((turns - low) / (high - low)).clamp(0.0, 1.0)
        return inv_freq * (keep + (1 - keep) / factor), 1.0
    return _yarn_frequencies(model, inv_freq), _yarn_attention_factor(model)


def apply_rope(apply_rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor, k: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [b, s, nq, d] and k [b, s, nk, d] rotated by `apply_rotary` (an `Ops.apply_rotary`) on their first
    2 * cos.shape[-1] channels (the tables' width says how many), the others unchanged."""
    rotated = 2 * cos.shape[-1]
    if rotated == q.shape[-1]:
        return apply_rotary(q, k, cos, sin)
    q_rot, k_rot = apply_rotary(q[..., :rotated], k[..., :rotated], cos, sin)
    return torch.cat((q_rot, q[..., rotated:]), dim=-1), torch.cat((k_rot, k[..., rotated:]), dim=-1)


def _yarn_frequencies(model: ModelConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    """YaRN's split: pairs that turn more than beta_fast times within the original context keep
    their frequency, those that turn fewer than beta_slow times are divided by the factor, and a
    linear ramp over the pair index runs between the two (bounds rounded outwards, as transformers'
    default truncate=True)."""
    dim, base = model.rotary_dim, model.rotary_base
    original = model.rope_scaling_original_max_position_embeddings

    def pair_turning(times: float) -> float:
        """The (fractional) pair index whose frequency turns `times` times within the original context."""
        return dim * math.log(original / (times * 2 * math.pi)) / (2 * math.log(base))

    fast, slow = model.rope_scaling_betas
    low, high = max(math.floor(pair_turning(fast)), 0), min(math.ceil(pair_turning(slow)), dim - 1)
    span = high - low if high != low else 1e-3  # transformers' guard against a zero-width ramp
    slowed = ((torch.arange(dim // 2, dtype=torch.float64) - low) / span).clamp(0.0, 1.0)
    return inv_freq * (1 - slowed) + inv_freq / model.rope_scaling_factor * slowed


def _yarn_attention_factor(model: ModelConfig) -> float:
    """The scale of cos and sin: given, or YaRN's 0.1 ln(factor) + 1, or DeepSeek's ratio of two such terms."""
    if model.rope_scaling_attention_factor is not None:
        return model.rope_scaling_attention_factor
    factor = model.rope_scaling_factor
    if model.rope_scaling_mscale is not None:  # validation: mscale_all_dim is set too
        return yarn_mscale(factor, model.rope_scaling_mscale) / yarn_mscale(factor, model.rope_scaling_mscale_all_dim)
    return yarn_mscale(factor, 1.0)
