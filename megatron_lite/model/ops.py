"""The ops the model computes with, chosen once per model: fused kernels or plain torch.

GPTModel picks one `Ops` from `ModelConfig.fused_kernels` and hands it to its layers, which
call it and never test the switch themselves. The plain-torch set is the kernels' references
(`megatron_lite/kernels/reference.py`, which imports no Triton), so `--no-fused-kernels` runs without
Triton. The fused set (`fused_ops.py`) is the public ops of `megatron_lite/kernels/`, which dispatch per
call: Triton on CUDA tensors (or anywhere under MEGATRON_LITE_TRITON=1), else those same
references, so CPU training computes the same math with the switch on or off.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_lite.kernels.reference import (
    NormOutput,
    apply_rotary_reference,
    attention_backward_reference,
    attention_forward_reference,
    flash_attention_reference,
    gelu_reference,
    layer_norm_reference,
    rms_norm_reference,
    swiglu_reference,
)
from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_linear_cross_entropy

Tensor = torch.Tensor


@dataclass(frozen=True)
class Ops:
    """One implementation of each op. The norms, apply_rotary, swiglu and gelu have the
    signatures of the `megatron_lite/kernels/` ops of those names; attention is causal and takes the dropout
    probability, the sliding window (None: the whole causal context) and the document mask
    (`doc_start` [b, s]: each token's document start, None: one document); lm_loss is
    `vocab_parallel_linear_cross_entropy` (the output layer and the loss over this rank's
    vocabulary shard). attention_block_forward / _backward are attention
    of equal-length q and k/v blocks returning / taking the row log-sum-exp (with the window
    and the blocks' position offset, and the rows' document start in the block's key positions),
    from which context parallelism builds attention over a split sequence."""
    rms_norm: Callable[..., NormOutput]
    layer_norm: Callable[..., NormOutput]
    apply_rotary: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
    swiglu: Callable[[Tensor], Tensor]
    gelu: Callable[[Tensor], Tensor]
    attention: Callable[..., Tensor]
    lm_loss: Callable[[Tensor, Tensor, Tensor, int], Tensor]
    attention_block_forward: Callable[..., tuple[Tensor, Tensor]]
    attention_block_backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


def attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, window: int | None = None,
              doc_start: Tensor | None = None) -> Tensor:
    """Causal attention of q [batch, heads, seq, dim] over k, v [batch, groups, seq, dim]."""
    return flash_attention_reference(q, k, v, causal=True, dropout_p=dropout_p, window=window, doc_start=doc_start)


TORCH_OPS = Ops(rms_norm=rms_norm_reference, layer_norm=layer_norm_reference, apply_rotary=apply_rotary_reference,
                swiglu=swiglu_reference, gelu=gelu_reference, attention=attention,
                lm_loss=vocab_parallel_linear_cross_entropy, attention_block_forward=attention_forward_reference,
                attention_block_backward=attention_backward_reference)


def select_ops(fused: bool) -> Ops:
    """The fused kernels' ops, or the plain-torch ones.

    Triton is a Linux-only dependency: elsewhere there is no kernel to run and the kernels
    would fall back to their torch references, which are TORCH_OPS.
    """
    if not fused or importlib.util.find_spec("triton") is None:
        return TORCH_OPS
    # The only place the model imports Triton; fused_ops does not import this module back.
    from megatron_lite.model import fused_ops
    return Ops(rms_norm=fused_ops.rms_norm, layer_norm=fused_ops.layer_norm, apply_rotary=fused_ops.apply_rotary,
               swiglu=fused_ops.swiglu, gelu=fused_ops.gelu, attention=fused_ops.attention,
               lm_loss=fused_ops.lm_loss, attention_block_forward=fused_ops.attention_block_forward,
               attention_block_backward=fused_ops.attention_block_backward)
