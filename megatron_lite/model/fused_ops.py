"""The model's ops from `kernels/`, one per field of `ops.Ops`; imported (and with it Triton)
only by `ops.select_ops` when ModelConfig.fused_kernels is on. It does not import `ops`, so
that the two modules do not import each other."""
from __future__ import annotations

import functools

import torch

from kernels.flash_attention import HEAD_DIMS, flash_attention
from kernels.gelu import gelu
from kernels.layernorm import layer_norm
from kernels.reference import flash_attention_reference
from kernels.rmsnorm import rms_norm
from kernels.rope import apply_rotary
from kernels.swiglu import swiglu
from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_linear_cross_entropy

__all__ = ["rms_norm", "layer_norm", "apply_rotary", "swiglu", "gelu", "attention", "lm_loss"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Flash attention where it applies, else SDPA: it has no dropout, only head dims in
    HEAD_DIMS, and in fp32 on a GPU its dots run in TF32 (a correctness path, slower and less
    exact than SDPA's fp32)."""
    if dropout_p or q.shape[-1] not in HEAD_DIMS or (q.is_cuda and q.dtype == torch.float32):
        return flash_attention_reference(q, k, v, causal=True, dropout_p=dropout_p)
    return flash_attention(q, k, v, causal=True)


lm_loss = functools.partial(vocab_parallel_linear_cross_entropy, fused=True)
