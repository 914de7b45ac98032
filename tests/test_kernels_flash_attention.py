"""flash_attention: Triton FA2 (interpreted on CPU, fp32) against torch SDPA.

Tolerances: fp32, atol 1e-4 / rtol 1e-4: online softmax and blockwise accumulation sum
in another order than SDPA's math path, and backward chains three matmuls.
"""
import pytest
import torch

from megatron_lite.kernels.flash_attention import flash_attention, flash_attention_backward, flash_attention_forward
from megatron_lite.kernels.reference import (
    attention_backward_reference,
    attention_forward_reference,
    flash_attention_reference,
)

pytestmark = pytest.mark.usefixtures("force_triton")
TOL = dict(atol=1e-4, rtol=1e-4)


def _outputs_and_grads(fn, q, k, v, do, **kwargs):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    out.backward(do)
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize(
    "batch,n_heads,n_kv_heads,seqlen,head_dim,causal",
    [
        (1, 2, 2, 37, 16, True),   # ragged tail, causal
        (1, 2, 2, 37, 16, False),  # ragged tail, bidirectional
        (2, 4, 2, 33, 32, True),   # GQA: two query heads per kv head
        (1, 3, 1, 20, 64, False),  # MQA
        (1, 4, 2, 37, 64, True),   # GQA, causal, ragged
        (1, 2, 1, 8, 32, True),    # shorter than one block
        (1, 2, 1, 19, 128, True),  # the largest head dim
    ],
)
def test_flash_attention_matches_sdpa(batch, n_heads, n_kv_heads, seqlen, head_dim, causal):
    torch.manual_seed(0)
    q = torch.randn(batch, n_heads, seqlen, head_dim)
    k, v = torch.randn(2, batch, n_kv_heads, seqlen, head_dim)
    do = torch.randn_like(q)
    got = _outputs_and_grads(flash_attention, q, k, v, do, causal=causal)
    want = _outputs_and_grads(flash_attention_reference, q, k, v, do, causal=causal)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{name}: {m}")


def test_flash_attention_strided_inputs_and_custom_scale():
    """q/k/v as transposed views of a [b, s, 3, nh, d] projection, as a model produces them."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 19, 3, 2, 16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    do = torch.randn(q.shape)
    got = _outputs_and_grads(flash_attention, q, k, v, do, causal=True, softmax_scale=0.3)
    want = _outputs_and_grads(flash_attention_reference, q, k, v, do, causal=True, softmax_scale=0.3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("causal", [True, False])
def test_block_forward_and_backward_with_lse_match_the_reference(causal):
    """The pieces ring attention is built from: the forward returns the natural-log lse, the backward
    takes an output and lse from outside (the merged ones), as when key blocks are split."""
    torch.manual_seed(0)
    q = torch.randn(1, 4, 24, 32)
    k, v = torch.randn(2, 1, 2, 24, 32)
    out, lse = flash_attention_forward(q, k, v, causal)
    want_out, want_lse = attention_forward_reference(q, k, v, causal)
    torch.testing.assert_close(out, want_out, **TOL)
    torch.testing.assert_close(lse, want_lse, **TOL)
    do = torch.randn_like(q)
    got = flash_attention_backward(q, k, v, want_out, want_lse, do, causal)
    want = attention_backward_reference(q, k, v, want_out, want_lse, do, causal)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("seqlen,window", [(37, 0), (37, 5), (40, 16), (37, 20), (33, 40)])
def test_sliding_window_matches_the_masked_reference(seqlen, window):
    """Each query sees itself and the `window` keys before it: windows inside one 16-row tile,
    on a tile edge, across tiles, and wider than the sequence (plain causal)."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, seqlen, 16)
    k, v = torch.randn(2, 2, 2, seqlen, 16)
    do = torch.randn_like(q)
    got = _outputs_and_grads(flash_attention, q, k, v, do, causal=True, window=window)
    want = _outputs_and_grads(flash_attention_reference, q, k, v, do, causal=True, window=window)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{name}: {m}")
    # The reference's mask is the window's: query i's output is attention over keys i-window..i alone.
    i = seqlen - 1
    lo = max(0, i - window)
    alone = flash_attention_reference(q[:, :, i:i + 1], k[:, :, lo:i + 1], v[:, :, lo:i + 1], causal=False)
    torch.testing.assert_close(want[0][:, :, i:i + 1], alone, **TOL)
    out, lse = flash_attention_forward(q, k, v, True, window=window)
    want_out, want_lse = attention_forward_reference(q, k, v, True, window=window)
    torch.testing.assert_close(out, want_out, **TOL)
    torch.testing.assert_close(lse, want_lse, **TOL)


def _doc_start(lengths_per_sample: list[list[int]]) -> torch.Tensor:
    """[b, s]: each position's document start, for documents of these lengths laid end to end."""
    rows = []
    for lengths in lengths_per_sample:
        starts = torch.cumsum(torch.tensor([0] + lengths[:-1]), 0)
        rows.append(torch.repeat_interleave(starts, torch.tensor(lengths)))
    return torch.stack(rows)


# Documents within one 16-row tile, across tiles and on tile edges, one document (plain causal),
# each sample its own; and with a window.
@pytest.mark.parametrize("lengths,window", [
    ([[5, 20, 3, 9], [37]], None),
    ([[16, 16, 5], [1, 1, 30, 5]], None),
    ([[40, 8], [3, 45]], 6),
])
def test_document_mask_matches_the_masked_reference(lengths, window):
    torch.manual_seed(0)
    doc = _doc_start(lengths)
    b, s = doc.shape
    q = torch.randn(b, 4, s, 16)
    k, v = torch.randn(2, b, 2, s, 16)
    do = torch.randn_like(q)
    got = _outputs_and_grads(flash_attention, q, k, v, do, causal=True, window=window, doc_start=doc)
    want = _outputs_and_grads(flash_attention_reference, q, k, v, do, causal=True, window=window, doc_start=doc)
    for name, a, b_ in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b_, **TOL, msg=lambda m: f"{name}: {m}")
    # The reference's mask is the documents': a document's output is its attention alone.
    first = lengths[0][0]
    alone = flash_attention_reference(q[:1, :, first:], k[:1, :, first:], v[:1, :, first:], causal=True,
                                      window=window, doc_start=doc[:1, first:] - first)
    torch.testing.assert_close(want[0][:1, :, first:], alone, **TOL)


@pytest.mark.parametrize("causal", [True, False])
def test_document_masked_blocks_match_the_reference(causal):
    """Context parallelism's blocks: doc_start in the key block's positions, below 0 (a document
    begun before the block) or past its end (rows that see none of its keys: output 0, lse -inf)."""
    torch.manual_seed(0)
    doc = torch.tensor([[-5] * 10 + [3] * 20 + [30] * 6 + [60] * 4, [0] * 40])
    q = torch.randn(2, 4, 40, 32)
    k, v = torch.randn(2, 2, 2, 40, 32)
    out, lse = flash_attention_forward(q, k, v, causal, doc_start=doc)
    want_out, want_lse = attention_forward_reference(q, k, v, causal, doc_start=doc)
    torch.testing.assert_close(out, want_out, **TOL)
    torch.testing.assert_close(lse, want_lse, **TOL)
    do = torch.randn_like(q)
    # The backward takes the merged lse of a whole attention, finite for every row.
    merged_lse = torch.logaddexp(want_lse, torch.zeros_like(want_lse))
    got = flash_attention_backward(q, k, v, want_out, merged_lse, do, causal, doc_start=doc)
    want = attention_backward_reference(q, k, v, want_out, merged_lse, do, causal, doc_start=doc)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
