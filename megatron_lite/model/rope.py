"""Rotary position embedding in the Hugging Face Llama ("rotate half") convention.

The two halves of each head are rotated as pairs (x[i], x[i + d/2]); using that convention
(rather than Meta's interleaved pairs) lets checkpoints map onto LlamaForCausalLM unchanged.
"""
from __future__ import annotations

import torch


def rotary_angles(seq_length: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angle, each [seq_length, head_dim // 2] in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_length, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [batch, seq, heads, head_dim] and k [batch, seq, groups, head_dim] by the angles
    of their positions, whose cos and sin are [seq, head_dim // 2]."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
