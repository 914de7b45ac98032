"""The model's ops from `kernels/`; imported only when ModelConfig.fused_kernels is on."""
from __future__ import annotations

import functools

import torch

from kernels.flash_attention import HEAD_DIMS, flash_attention
from kernels.gelu import gelu
from kernels.layernorm import layer_norm
from kernels.rmsnorm import rms_norm
from kernels.rope import apply_rotary
from kernels.swiglu import swiglu
from megatron_lite.model.ops import Ops
from megatron_lite.model.ops import attention as sdpa_attention
from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_linear_cross_entropy


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Flash attention where it applies, else SDPA: it has no dropout, only head dims in
    HEAD_DIMS, and in fp32 on a GPU its dots run in TF32 (a correctness path, slower and less
    exact than SDPA's fp32)."""
    if dropout_p or q.shape[-1] not in HEAD_DIMS or (q.is_cuda and q.dtype == torch.float32):
        return sdpa_attention(q, k, v, dropout_p)
    return flash_attention(q, k, v, causal=True)


FUSED_OPS = Ops(rms_norm=rms_norm, layer_norm=layer_norm, apply_rotary=apply_rotary, swiglu=swiglu, gelu=gelu,
                attention=attention, lm_loss=functools.partial(vocab_parallel_linear_cross_entropy, fused=True))
