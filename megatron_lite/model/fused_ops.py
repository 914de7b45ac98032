"""The model's ops from `megatron_lite/kernels/`, one per field of `ops.Ops`; imported (and with it Triton)
only by `ops.select_ops` when ModelConfig.fused_kernels is on. It does not import `ops`, so
that the two modules do not import each other."""
from __future__ import annotations

import functools

import torch

from megatron_lite.kernels.flash_attention import (
    HEAD_DIMS,
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
)
from megatron_lite.kernels.gelu import gelu
from megatron_lite.kernels.layernorm import layer_norm
from megatron_lite.kernels.reference import (
    attention_backward_reference,
    attention_forward_reference,
    flash_attention_reference,
)
from megatron_lite.kernels.rmsnorm import rms_norm
from megatron_lite.kernels.rope import apply_rotary
from megatron_lite.kernels.swiglu import swiglu
from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_linear_cross_entropy

__all__ = ["rms_norm", "layer_norm", "apply_rotary", "swiglu", "gelu", "attention", "lm_loss",
           "attention_block_forward", "attention_block_backward"]


def _kernel_applies(q: torch.Tensor) -> bool:
    """Flash attention runs only head dims in HEAD_DIMS, and in fp32 on a GPU its dots would run
    in TF32 (a correctness path, slower and less exact than the reference's fp32)."""
    return q.shape[-1] in HEAD_DIMS and not (q.is_cuda and q.dtype == torch.float32)


def attention_block_forward(q, k, v, causal: bool, window: int | None = None, offset: int = 0,
                            doc_start: torch.Tensor | None = None):
    forward = flash_attention_forward if _kernel_applies(q) else attention_forward_reference
    return forward(q, k, v, causal, window=window, offset=offset, doc_start=doc_start)


def attention_block_backward(q, k, v, out, lse, dout, causal: bool, window: int | None = None, offset: int = 0,
                             doc_start: torch.Tensor | None = None):
    backward = flash_attention_backward if _kernel_applies(q) else attention_backward_reference
    return backward(q, k, v, out, lse, dout, causal, window=window, offset=offset, doc_start=doc_start)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
              window: int | None = None, doc_start: torch.Tensor | None = None) -> torch.Tensor:
    """Flash attention where it applies (it has no dropout), else SDPA."""
    if dropout_p or not _kernel_applies(q):
        return flash_attention_reference(q, k, v, causal=True, dropout_p=dropout_p, window=window,
                                         doc_start=doc_start)
    return flash_attention(q, k, v, causal=True, window=window, doc_start=doc_start)


lm_loss = functools.partial(vocab_parallel_linear_cross_entropy, fused=True)
