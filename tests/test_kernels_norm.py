"""rms_norm and layer_norm: Triton (interpreted on CPU, fp32) against the torch references.

Tolerances: fp32, atol 1e-5 / rtol 1e-4 (the kernel and torch sum rows in different orders).
"""
import pytest
import torch

from megatron_lite.kernels.layernorm import layer_norm
from megatron_lite.kernels.reference import layer_norm_reference, rms_norm_reference
from megatron_lite.kernels.rmsnorm import rms_norm

pytestmark = pytest.mark.usefixtures("force_triton")
TOL = dict(atol=1e-5, rtol=1e-4)


def _outputs_and_grads(fn, inputs: dict, cotangents):
    """fn(**inputs) and the grads of every input, for fixed cotangents of its outputs."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = fn(**leaves)
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(out, cotangents[: len(out)])
    return list(out) + [v.grad for v in leaves.values() if v is not None]


def _inputs(shape, residual: bool) -> dict:
    torch.manual_seed(0)
    return dict(
        x=torch.randn(shape),
        weight=1 + 0.1 * torch.randn(shape[-1]),
        residual=torch.randn(shape) if residual else None,
    )


def _assert_same(fn, ref, inputs):
    shape = inputs["x"].shape
    cotangents = [torch.randn(shape), torch.randn(shape)]
    got = _outputs_and_grads(fn, inputs, cotangents)
    want = _outputs_and_grads(ref, inputs, cotangents)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("shape", [(2, 5, 48), (37, 100)])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(shape, residual):
    inputs = _inputs(shape, residual)
    _assert_same(
        lambda **t: rms_norm(eps=1e-6, **t), lambda **t: rms_norm_reference(eps=1e-6, **t), inputs
    )


@pytest.mark.parametrize("shape", [(2, 5, 48), (37, 100)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_norm(shape, residual, bias):
    inputs = _inputs(shape, residual)
    inputs["bias"] = torch.randn(shape[-1]) if bias else None
    _assert_same(
        lambda **t: layer_norm(eps=1e-5, **t), lambda **t: layer_norm_reference(eps=1e-5, **t), inputs
    )


def test_unused_residual_output_needs_no_gradient():
    """Only y is used downstream (e.g. the final norm): h gets no gradient and that is fine."""
    inputs = _inputs((6, 48), residual=True)
    x, r = inputs["x"].requires_grad_(), inputs["residual"].requires_grad_()
    y, _ = rms_norm(x, inputs["weight"], 1e-6, residual=r)
    y.sum().backward()
    xr, rr = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    rms_norm_reference(xr, inputs["weight"], 1e-6, residual=rr)[0].sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **TOL)
    torch.testing.assert_close(r.grad, rr.grad, **TOL)
