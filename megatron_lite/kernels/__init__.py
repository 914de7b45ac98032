"""Fused Triton kernels, one op per file; their plain-torch references are `reference.py`.

This package and `reference.py` import no Triton, so the references (the model's ops under
--no-fused-kernels) load where Triton is absent; the kernel modules import it.

Every public op dispatches with the same rule, `use_triton`: the Triton kernel runs when
its input lives on a CUDA device, or on any device when the environment sets
MEGATRON_LITE_TRITON=1 (on CPU that also needs TRITON_INTERPRET=1 set before the first
kernel module is imported, because `triton.jit` picks compile-or-interpret when it
decorates). Otherwise the plain-torch reference runs, which is what CPU training uses.
"""
import os

import torch


def use_triton(t: torch.Tensor) -> bool:
    """True when the op on tensor `t` should run its Triton kernel."""
    return t.is_cuda or os.environ.get("MEGATRON_LITE_TRITON") == "1"
