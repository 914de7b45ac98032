"""Rotary position embedding in the Hugging Face Llama ("rotate half") convention: the angles
here; the rotation is `Ops.apply_rotary` (the kernel or `kernels.reference.apply_rotary_reference`).

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

