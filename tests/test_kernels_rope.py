"""apply_rotary: Triton (interpreted on CPU, fp32) against the torch reference.

Tolerances: fp32, atol 1e-5 / rtol 1e-4 (one multiply-add per element).
"""
import pytest
import torch

from megatron_lite.kernels.reference import apply_rotary_reference
from megatron_lite.kernels.rope import apply_rotary

pytestmark = pytest.mark.usefixtures("force_triton")
TOL = dict(atol=1e-5, rtol=1e-4)


def _angles(seqlen: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    theta = torch.outer(torch.arange(seqlen, dtype=torch.float32), inv_freq)
    return theta.cos(), theta.sin()


def _q_and_k(batch, seqlen, n_q, n_k, head_dim, from_fused_qkv: bool):
    """q and k as fresh tensors, or as strided slices of one fused [b, s, nq+2nk, d] qkv."""
    if from_fused_qkv:
        qkv = torch.randn(batch, seqlen, n_q + 2 * n_k, head_dim)
        return qkv[:, :, :n_q], qkv[:, :, n_q : n_q + n_k]
    return torch.randn(batch, seqlen, n_q, head_dim), torch.randn(batch, seqlen, n_k, head_dim)


@pytest.mark.parametrize(
    "batch,seqlen,n_q,n_k,head_dim,fused",
    [(2, 37, 4, 2, 16, False), (1, 9, 6, 6, 32, True), (1, 5, 3, 1, 12, True)],
)
def test_apply_rotary_matches_reference(batch, seqlen, n_q, n_k, head_dim, fused):
    torch.manual_seed(0)
    q, k = _q_and_k(batch, seqlen, n_q, n_k, head_dim, fused)
    cos, sin = _angles(seqlen, head_dim)
    dq_out, dk_out = torch.randn(q.shape), torch.randn(k.shape)
    results = []
    for fn in (apply_rotary, apply_rotary_reference):
        qq, kk = q.detach().requires_grad_(), k.detach().requires_grad_()
        q_out, k_out = fn(qq, kk, cos, sin)
        torch.autograd.backward((q_out, k_out), (dq_out, dk_out))
        results.append((q_out, k_out, qq.grad, kk.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **TOL)


def test_rotation_at_position_zero_is_identity_and_preserves_norm():
    torch.manual_seed(0)
    q, k = _q_and_k(1, 8, 2, 1, 16, from_fused_qkv=False)
    q_out, k_out = apply_rotary(q, k, *_angles(8, 16))
    torch.testing.assert_close(q_out[:, 0], q[:, 0], **TOL)
    torch.testing.assert_close(q_out.norm(dim=-1), q.norm(dim=-1), **TOL)
    torch.testing.assert_close(k_out.norm(dim=-1), k.norm(dim=-1), **TOL)


def test_per_sample_positions_rotate_each_sample_by_its_own_angles():
    """cos/sin [b, s, d/2] (--reset-position-ids: positions restart in each document): each sample
    rotated as if alone with its table rows."""
    torch.manual_seed(0)
    q, k = _q_and_k(2, 9, 4, 2, 16, from_fused_qkv=True)
    cos, sin = _angles(9, 16)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 0, 1]])
    q_out, k_out = apply_rotary(q, k, cos[positions], sin[positions])
    for b in range(2):
        want = apply_rotary_reference(q[b:b + 1], k[b:b + 1], cos[positions[b]], sin[positions[b]])
        torch.testing.assert_close(q_out[b:b + 1], want[0], **TOL)
        torch.testing.assert_close(k_out[b:b + 1], want[1], **TOL)
