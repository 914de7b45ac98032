"""The one dispatch rule of megatron_lite/kernels/: Triton on CUDA or when MEGATRON_LITE_TRITON=1."""
import pytest
import torch

from megatron_lite.kernels import use_triton
from megatron_lite.kernels.rmsnorm import rms_norm


def test_cpu_tensors_use_the_reference_unless_triton_is_asked_for(monkeypatch: pytest.MonkeyPatch):
    x, w = torch.randn(4, 8, requires_grad=True), torch.ones(8)
    monkeypatch.delenv("MEGATRON_LITE_TRITON", raising=False)
    assert not use_triton(x)
    assert type(rms_norm(x, w, 1e-6).grad_fn).__name__ != "RowNormFunctionBackward"
    monkeypatch.setenv("MEGATRON_LITE_TRITON", "1")
    assert use_triton(x)
    assert type(rms_norm(x, w, 1e-6).grad_fn).__name__ == "RowNormFunctionBackward"
