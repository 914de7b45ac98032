"""swiglu and gelu: Triton (interpreted on CPU, fp32) against the torch references.

Tolerances: fp32, atol 1e-5 / rtol 1e-4 (exp-based sigmoid/tanh vs torch's own).
"""
import pytest
import torch

from megatron_lite.kernels.gelu import gelu
from megatron_lite.kernels.reference import gelu_reference, swiglu_reference
from megatron_lite.kernels.swiglu import swiglu

pytestmark = pytest.mark.usefixtures("force_triton")
TOL = dict(atol=1e-5, rtol=1e-4)


def _value_and_grad(fn, x: torch.Tensor, dy: torch.Tensor):
    x = x.detach().requires_grad_()
    y = fn(x)
    y.backward(dy)
    return y, x.grad


def _assert_same(fn, ref, x):
    dy = torch.randn(ref(x).shape)
    for got, want in zip(_value_and_grad(fn, x, dy), _value_and_grad(ref, x, dy)):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("shape", [(3, 37, 200), (5, 2200)])
def test_swiglu(shape):
    torch.manual_seed(0)
    _assert_same(swiglu, swiglu_reference, 3 * torch.randn(shape))


def test_swiglu_strided_rows():
    """Rows of a wider buffer (e.g. a slice of a fused projection) are read in place."""
    torch.manual_seed(0)
    x = torch.randn(7, 130)[:, :96]
    _assert_same(swiglu, swiglu_reference, x)


@pytest.mark.parametrize("shape", [(37, 100), (4, 5, 48)])
def test_gelu(shape):
    torch.manual_seed(0)
    _assert_same(gelu, gelu_reference, 3 * torch.randn(shape))


def test_gelu_saturates_without_overflow():
    x = torch.tensor([-200.0, -30.0, 0.0, 30.0, 200.0])
    _assert_same(gelu, gelu_reference, x)
