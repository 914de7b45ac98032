"""What `tools/bench_kernels.py` measures: per op, realistic shapes and the implementations raced.

Every case names "ours" (the public op, dispatched to Triton) and "eager" (its plain-torch
reference); bench.py adds torch.compile of the reference. Liger-Kernel and the SDPA flash
backend join where they apply and are importable. Work is counted once per case:
  GB/s    the bytes the op must move at least (each input read once, each output written
          once), so a slower implementation simply shows a lower figure;
  TFLOP/s model FLOPs (attention: 4 b h s^2 d, halved when causal; backward = 2.5x forward;
          document-masked attention: 4 b h d sum(L^2)/2 over its documents of L tokens, the
          work left to do, also for the plain causal kernel raced against it as "causal").
Shapes are Llama-3.2-1B / Llama-3-8B sized (hidden 2048 / 4096, seq 2k-8k, vocab 32k-128k)
with batches that fit an 80 GB GPU including the eager baseline's intermediates.
"""
import random
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_lite.kernels.cross_entropy import cross_entropy
from megatron_lite.kernels.flash_attention import flash_attention
from megatron_lite.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from megatron_lite.kernels.gelu import gelu
from megatron_lite.kernels.layernorm import layer_norm
from megatron_lite.kernels.reference import (
    apply_rotary_reference,
    cross_entropy_reference,
    flash_attention_reference,
    fused_linear_cross_entropy_reference,
    gelu_reference,
    layer_norm_reference,
    rms_norm_reference,
    swiglu_reference,
)
from megatron_lite.kernels.rmsnorm import rms_norm
from megatron_lite.kernels.rope import apply_rotary
from megatron_lite.kernels.swiglu import swiglu

EPS = 1e-5


@dataclass
class Case:
    op: str
    shape: str
    make_inputs: Callable[[], dict]  # fresh inputs; those to differentiate require grad
    impls: dict  # name -> fn(**inputs) -> tensor or tuple of tensors
    unit: str  # "GB/s" or "TFLOP/s"
    work_fwd: float  # bytes or FLOPs of the forward
    work_fwd_bwd: float
    baseline: Optional[str] = None  # an impl that "ours" is also compared with (bench.py prints the ratio)


def _liger(name: str) -> Optional[Callable]:
    """A Liger-Kernel functional op, or None when Liger is not installed."""
    try:
        from liger_kernel.transformers import functional
    except Exception:
        return None
    return getattr(functional, name, None)


def _randn(shape, device, dtype, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(shape, device=device)).to(dtype).requires_grad_()


def _norm_inputs(n: int, h: int, device, dtype, bias: bool) -> Callable[[], dict]:
    def make():
        inputs = dict(x=_randn((n, h), device, dtype), residual=_randn((n, h), device, dtype),
                      weight=_randn(h, device, dtype, scale=0.1))
        if bias:
            inputs["bias"] = _randn(h, device, dtype, scale=0.1)
        return inputs

    return make


# Both norms: fwd reads x and residual, writes y and h; bwd reads dy, dh and h, writes dx.
def _rmsnorm_case(n, h, device, dtype) -> Case:
    impls = dict(ours=lambda x, residual, weight: rms_norm(x, weight, EPS, residual),
                 eager=lambda x, residual, weight: rms_norm_reference(x, weight, EPS, residual))
    liger = _liger("liger_rms_norm")
    if liger:
        def liger_with_residual(x, residual, weight):
            h = x + residual
            return liger(h, weight, EPS, in_place=False), h

        impls["liger"] = liger_with_residual
    act = n * h * dtype.itemsize
    make = _norm_inputs(n, h, device, dtype, bias=False)
    return Case("rmsnorm", f"{n}x{h}", make, impls, "GB/s", 4 * act, 8 * act)


def _layernorm_case(n, h, device, dtype) -> Case:
    def ours(x, residual, weight, bias):
        return layer_norm(x, weight, bias, EPS, residual)

    def eager(x, residual, weight, bias):
        return layer_norm_reference(x, weight, bias, EPS, residual)

    impls = dict(ours=ours, eager=eager)
    liger = _liger("liger_layer_norm")
    if liger:
        def liger_with_residual(x, residual, weight, bias):
            h = x + residual
            return liger(h, weight, bias, EPS), h

        impls["liger"] = liger_with_residual
    act = n * h * dtype.itemsize
    make = _norm_inputs(n, h, device, dtype, bias=True)
    return Case("layernorm", f"{n}x{h}", make, impls, "GB/s", 4 * act, 8 * act)


def _rope_case(b, s, nq, nk, d, device, dtype) -> Case:
    def make():
        inv_freq = 10000.0 ** (-torch.arange(0, d, 2, device=device) / d)
        theta = torch.outer(torch.arange(s, device=device, dtype=torch.float32), inv_freq)
        return dict(q=_randn((b, s, nq, d), device, dtype), k=_randn((b, s, nk, d), device, dtype),
                    cos=theta.cos(), sin=theta.sin())

    impls = dict(ours=apply_rotary, eager=apply_rotary_reference)
    liger = _liger("liger_rope")
    if liger:
        def liger_rope(q, k, cos, sin):  # Liger wants [b, h, s, d] and full-width [1, s, d] cos/sin
            cos, sin = torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]
            return liger(q.transpose(1, 2), k.transpose(1, 2), cos, sin)

        impls["liger"] = liger_rope
    qk = b * s * (nq + nk) * d * dtype.itemsize
    return Case("rope", f"b{b} s{s} nq{nq} nk{nk} d{d}", make, impls, "GB/s", 2 * qk, 4 * qk)


def _swiglu_case(n, f, device, dtype) -> Case:
    impls = dict(ours=swiglu, eager=swiglu_reference)
    liger = _liger("liger_swiglu")
    if liger:
        impls["liger"] = lambda x: liger(*x.chunk(2, dim=-1))
    act = n * f * dtype.itemsize
    # fwd reads 2f, writes f; bwd reads x (2f) and dy (f), writes dx (2f).
    return Case("swiglu", f"{n}x{2 * f}", lambda: dict(x=_randn((n, 2 * f), device, dtype)), impls,
                "GB/s", 3 * act, 8 * act)


def _gelu_case(n, m, device, dtype) -> Case:
    act = n * m * dtype.itemsize
    return Case("gelu", f"{n}x{m}", lambda: dict(x=_randn((n, m), device, dtype)),
                dict(ours=gelu, eager=gelu_reference), "GB/s", 2 * act, 5 * act)


def _ce_case(n, v, device, dtype) -> Case:
    def make():
        return dict(logits=_randn((n, v), device, dtype, scale=2.0),
                    target=torch.randint(0, v, (n,), device=device))

    impls = dict(ours=lambda logits, target: cross_entropy(logits, target).mean(),
                 eager=lambda logits, target: cross_entropy_reference(logits, target).mean())
    liger = _liger("liger_cross_entropy")
    if liger:
        impls["liger"] = liger
    size = n * v * dtype.itemsize
    # fwd reads the logits once; bwd reads them again and writes their gradient.
    return Case("cross_entropy", f"{n}x{v}", make, impls, "GB/s", size, 3 * size)


def _flce_case(n, h, v, device, dtype) -> Case:
    def make():
        return dict(hidden=_randn((n, h), device, dtype), weight=_randn((v, h), device, dtype, scale=h**-0.5),
                    target=torch.randint(0, v, (n,), device=device))

    def ours(hidden, weight, target):
        return fused_linear_cross_entropy(hidden, weight, target).mean()

    def eager(hidden, weight, target):
        return fused_linear_cross_entropy_reference(hidden, weight, target).mean()

    impls = dict(ours=ours, eager=eager)
    liger = _liger("liger_fused_linear_cross_entropy")
    if liger:
        impls["liger"] = liger
    flops = 2.0 * n * v * h
    return Case("fused_linear_cross_entropy", f"n{n} h{h} v{v}", make, impls, "TFLOP/s", flops, 3 * flops)


def _attention_case(b, nh, nkv, s, d, device, dtype) -> Case:
    def make():
        return dict(q=_randn((b, nh, s, d), device, dtype), k=_randn((b, nkv, s, d), device, dtype),
                    v=_randn((b, nkv, s, d), device, dtype))

    impls = dict(ours=flash_attention, eager=flash_attention_reference)
    if device.type == "cuda":
        impls["sdpa_flash"] = _sdpa_flash
    flops = 4.0 * b * nh * s * s * d / 2  # causal
    shape = f"b{b} nh{nh} nkv{nkv} s{s} d{d}"
    return Case("flash_attention", shape, make, impls, "TFLOP/s", flops, 3.5 * flops)


def _document_lengths(s: int, documents: int) -> list:
    """`documents` lengths summing to s, cut at fixed pseudo-random places (uneven, as in a corpus)."""
    cuts = sorted(random.Random(0).sample(range(1, s), documents - 1))
    return [b - a for a, b in zip([0] + cuts, cuts + [s])]


def _document_attention_case(b, nh, nkv, s, d, documents, device, dtype) -> Case:
    """Packed samples of `documents` documents (--reset-attention-mask): the kernel skipping the
    key blocks of other documents, against the same kernel attending causally over the sample."""
    lengths = _document_lengths(s, documents)
    starts = torch.repeat_interleave(torch.tensor([sum(lengths[:i]) for i in range(documents)]),
                                     torch.tensor(lengths)).to(device).expand(b, s).contiguous()

    def make():
        return dict(q=_randn((b, nh, s, d), device, dtype), k=_randn((b, nkv, s, d), device, dtype),
                    v=_randn((b, nkv, s, d), device, dtype))

    impls = dict(ours=lambda q, k, v: flash_attention(q, k, v, doc_start=starts),
                 eager=lambda q, k, v: flash_attention_reference(q, k, v, doc_start=starts),
                 causal=flash_attention)
    flops = 4.0 * b * nh * d * sum(n * n for n in lengths) / 2
    shape = f"b{b} nh{nh} nkv{nkv} s{s} d{d} {documents} documents"
    return Case("flash_attention_documents", shape, make, impls, "TFLOP/s", flops, 3.5 * flops, baseline="causal")


def _sdpa_flash(q, k, v):
    """torch's FlashAttention-2 backend; kv heads expanded first, as that backend wants."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


# op -> (shapes on a GPU, tiny shapes for --cpu-smoke, builder(*shape, device, dtype))
OPS = {
    "rmsnorm": ([(16384, 2048), (16384, 4096), (32768, 4096)], [(37, 48)], _rmsnorm_case),
    "layernorm": ([(16384, 2048), (16384, 4096), (32768, 4096)], [(37, 48)], _layernorm_case),
    "rope": ([(2, 8192, 32, 8, 64), (4, 4096, 32, 8, 128), (2, 8192, 32, 8, 128)],
             [(1, 9, 4, 2, 16)], _rope_case),
    "swiglu": ([(16384, 8192), (16384, 14336)], [(37, 48)], _swiglu_case),
    "gelu": ([(16384, 8192), (16384, 16384)], [(37, 100)], _gelu_case),
    "cross_entropy": ([(8192, 32000), (8192, 128256), (16384, 128256)], [(37, 300)], _ce_case),
    "fused_linear_cross_entropy": ([(16384, 2048, 128256), (8192, 4096, 128256)],
                                   [(37, 32, 300)], _flce_case),
    "flash_attention": ([(4, 32, 8, 2048, 64), (2, 32, 8, 4096, 128), (1, 32, 8, 8192, 128)],
                        [(1, 2, 1, 20, 16)], _attention_case),
    "flash_attention_documents": ([(2, 32, 8, 4096, 128, 8), (4, 32, 8, 2048, 64, 8)], [(1, 2, 1, 48, 16, 8)],
                                  _document_attention_case),
}


def cases(ops: list, device: torch.device, dtype: torch.dtype, smoke: bool, quick: bool) -> list:
    """The cases to run, in OPS order."""
    out = []
    for op in ops:
        gpu_shapes, smoke_shapes, build = OPS[op]
        shapes = smoke_shapes if smoke else gpu_shapes[:1] if quick else gpu_shapes
        out += [build(*shape, device, dtype) for shape in shapes]
    return out
