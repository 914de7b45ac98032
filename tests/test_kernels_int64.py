"""Kernels form row/head/batch offsets in int64 (`megatron_lite.kernels._common.ptr_add`).

A row that starts past element 2**31 needs an 8 GiB tensor, which a test cannot allocate.
It does not have to: the tensors below are strided views into a sparse file mapped with
torch.from_file, so only the pages of the few rows actually touched ever exist. The row
stride 2**30 + 64 fits in int32, so Triton passes it as int32 and `row * stride` for row 2
wraps negative unless the kernel widens it first; the interpreter's int32 arithmetic wraps
exactly as the GPU's does, so these tests fail on any int32 offset. The views start
2**31 elements into the file, so that a wrapped offset still lands inside the mapping and
reads zeros: a wrong answer and a clean failure rather than a segfault.
"""
import tempfile

import pytest
import torch

from megatron_lite.kernels.cross_entropy import cross_entropy
from megatron_lite.kernels.flash_attention import flash_attention
from megatron_lite.kernels.reference import cross_entropy_reference, flash_attention_reference, rms_norm_reference
from megatron_lite.kernels.rmsnorm import rms_norm

pytestmark = pytest.mark.usefixtures("force_triton")
TOL = dict(atol=1e-5, rtol=1e-4)
STRIDE = 2**30 + 64  # in int32 range; 2 * STRIDE is not


START = 2**31


@pytest.fixture
def sparse_storage():
    """A float32 tensor of START + 2 * STRIDE + 4096 elements (16 GiB) in a sparse file."""
    numel = START + 2 * STRIDE + 4096
    with tempfile.NamedTemporaryFile() as f:
        f.truncate(numel * 4)
        yield torch.from_file(f.name, shared=True, size=numel, dtype=torch.float32)


def _far_apart(storage: torch.Tensor, shape: tuple, strides: tuple) -> torch.Tensor:
    """A random-filled view whose first dim steps STRIDE elements through `storage`."""
    view = storage.as_strided(shape, (STRIDE,) + strides, START)
    torch.manual_seed(0)
    view.copy_(torch.randn(shape))
    return view


def _grads(fn, *inputs, cotangent):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(cotangent)
    return [out] + [t.grad for t in leaves]


def test_rms_norm_rows_beyond_int32(sparse_storage):
    x = _far_apart(sparse_storage, (3, 100), (1,))
    w = torch.ones(100)
    dy = torch.randn(3, 100)
    got = _grads(lambda x: rms_norm(x, w, 1e-6), x, cotangent=dy)
    want = _grads(lambda x: rms_norm_reference(x, w, 1e-6), x.clone(), cotangent=dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def test_cross_entropy_rows_beyond_int32(sparse_storage):
    logits = _far_apart(sparse_storage, (3, 1000), (1,))
    target = torch.tensor([5, 999, 123])
    dloss = torch.rand(3)
    got = _grads(lambda x: cross_entropy(x, target), logits, cotangent=dloss)
    want = _grads(lambda x: cross_entropy_reference(x, target), logits.clone(), cotangent=dloss)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def test_flash_attention_batches_beyond_int32(sparse_storage):
    """q, k and v are batches 0..2 STRIDE apart, heads/rows packed inside each batch."""
    packed = _far_apart(sparse_storage, (3, 2, 9, 48), (9 * 48, 48, 1))
    q, k, v = packed[..., :16], packed[..., 16:32], packed[..., 32:]
    do = torch.randn(q.shape)
    got = _grads(flash_attention, q, k, v, cotangent=do)
    want = _grads(flash_attention_reference, *(t.clone() for t in (q, k, v)), cotangent=do)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
