"""The ops the model computes with, chosen once per model: fused kernels or plain torch.

`ModelConfig.fused_kernels` picks one `Ops` when a module is built; the layers call it and
never test the switch themselves. The plain-torch set is the model's own code and does not
import Triton, so `--no-fused-kernels` runs the model exactly as it was before the kernels.
The fused set (`fused_ops.py`) is the public ops of `kernels/`, which dispatch per call:
Triton on CUDA tensors (or anywhere under MEGATRON_LITE_TRITON=1), else their plain-torch
references, so CPU training computes the same math with the switch on or off.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_lite.model import norms, rope
from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_linear_cross_entropy

Tensor = torch.Tensor


@dataclass(frozen=True)
class Ops:
    """One implementation of each op. The norms, apply_rotary, swiglu and gelu have the
    signatures of the `kernels/` ops of those names; attention is causal and takes the dropout
    probability; lm_loss is `vocab_parallel_linear_cross_entropy` (the output layer and the
    loss over this rank's vocabulary shard)."""
    rms_norm: Callable[..., norms.NormOutput]
    layer_norm: Callable[..., norms.NormOutput]
    apply_rotary: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
    swiglu: Callable[[Tensor], Tensor]
    gelu: Callable[[Tensor], Tensor]
    attention: Callable[[Tensor, Tensor, Tensor, float], Tensor]
    lm_loss: Callable[[Tensor, Tensor, Tensor, int], Tensor]


def swiglu(x: Tensor) -> Tensor:
    """silu(gate) * up for x = [gate; up] on the last dim."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Causal attention of q [batch, heads, seq, dim] over k, v [batch, groups, seq, dim]:
    SDPA, each key/value head repeated for the heads/groups query heads it serves."""
    heads_per_group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(heads_per_group, dim=1)
    v = v.repeat_interleave(heads_per_group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


TORCH_OPS = Ops(rms_norm=norms.rms_norm, layer_norm=norms.layer_norm, apply_rotary=rope.apply_rotary,
                swiglu=swiglu, gelu=gelu, attention=attention,
                lm_loss=vocab_parallel_linear_cross_entropy)


def select_ops(fused: bool) -> Ops:
    """The fused kernels' ops, or the plain-torch ones.

    Triton is a Linux-only dependency: elsewhere there is no kernel to run and the kernels
    would fall back to their torch references, which compute what TORCH_OPS does.
    """
    if not fused or importlib.util.find_spec("triton") is None:
        return TORCH_OPS
    from megatron_lite.model.fused_ops import FUSED_OPS  # the only place the model imports Triton
    return FUSED_OPS
