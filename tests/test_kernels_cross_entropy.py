"""cross_entropy and fused_linear_cross_entropy against F.cross_entropy, fp32 on CPU.

Vocab parallelism is tested without processes: `ThreadGroup` runs one thread per TP
rank, each with only its own vocab shard, and the ranks meet only in all_reduce, which
combines the tensors every rank posted, as a real all-reduce does.

Tolerances: fp32, atol 2e-5 / rtol 1e-4 for losses and logit grads (exp/log in a
different order); atol 1e-4 / rtol 1e-4 where a matmul over the vocab follows.
"""
import threading
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.kernels.cross_entropy import cross_entropy
from megatron_lite.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from megatron_lite.kernels.reference import cross_entropy_reference, fused_linear_cross_entropy_reference

pytestmark = pytest.mark.usefixtures("force_triton")
TOL = dict(atol=2e-5, rtol=1e-4)
MATMUL_TOL = dict(atol=1e-4, rtol=1e-4)
IGNORE = -100


class ThreadGroup:
    """A TP group of `world` ranks as threads. One rank runs at a time (the Triton
    interpreter is not thread-safe): a rank holds the lock except while it waits in
    all_reduce, so all ranks make progress exactly as far as their collectives allow."""

    def __init__(self, world: int):
        self.world = world
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(world, timeout=120)
        self.posted: list = [None] * world

    def _wait_for_all(self) -> None:
        self.lock.release()
        try:
            self.barrier.wait()
        finally:
            self.lock.acquire()

    def all_reduce(self, rank: int, t: torch.Tensor, op: Callable) -> None:
        self.posted[rank] = t.clone()
        self._wait_for_all()
        t.copy_(op(torch.stack(self.posted), dim=0))
        self._wait_for_all()  # nobody posts the next collective before everyone read this one

    def run(self, fn: Callable) -> list:
        """fn(rank, reduce_max, reduce_sum) on every rank; returns the per-rank results."""
        results: list = [None] * self.world
        errors: list = []

        def worker(rank: int) -> None:
            with self.lock:
                try:
                    results[rank] = fn(
                        rank,
                        lambda t: self.all_reduce(rank, t, torch.amax),
                        lambda t: self.all_reduce(rank, t, torch.sum),
                    )
                except BaseException as e:  # re-raised in the main thread below
                    errors.append(e)
                    self.barrier.abort()

        threads = [threading.Thread(target=worker, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def _targets(n: int, vocab: int) -> torch.Tensor:
    target = torch.randint(0, vocab, (n,))
    target[::5] = IGNORE
    return target


def _expected(logits: torch.Tensor, target: torch.Tensor, dloss: torch.Tensor):
    """F.cross_entropy's per-row loss and its gradient for the cotangent dloss."""
    logits = logits.detach().requires_grad_()
    loss = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
    loss.backward(dloss)
    return loss, logits.grad


@pytest.mark.parametrize("impl", [cross_entropy, cross_entropy_reference])
@pytest.mark.parametrize("vocab,padded", [(1000, 1000), (1000, 1024)])
def test_cross_entropy_single_device(impl, vocab, padded):
    torch.manual_seed(0)
    logits = 4 * torch.randn(37, padded)
    target, dloss = _targets(37, vocab), torch.rand(37)
    want_loss, want_grad = _expected(logits[:, :vocab], target, dloss)

    x = logits.clone().requires_grad_()
    loss = impl(x, target, vocab_size=vocab)
    loss.backward(dloss)
    torch.testing.assert_close(loss, want_loss, **TOL)
    torch.testing.assert_close(x.grad[:, :vocab], want_grad, **TOL)
    assert torch.all(x.grad[:, vocab:] == 0), "pad columns must get no gradient"


@pytest.mark.parametrize("impl", [cross_entropy, cross_entropy_reference])
def test_cross_entropy_vocab_parallel(impl):
    """vocab 1000 padded to 1024 over 2 ranks: rank 1 holds 488 real columns and 24 pad."""
    torch.manual_seed(0)
    vocab, world, shard = 1000, 2, 512
    logits = 4 * torch.randn(37, world * shard)
    logits[:, vocab:] = 50.0  # pad entries that would dominate the softmax if counted
    target, dloss = _targets(37, vocab), torch.rand(37)
    want_loss, want_grad = _expected(logits[:, :vocab], target, dloss)

    def rank_fn(rank, reduce_max, reduce_sum):
        x = logits[:, rank * shard : (rank + 1) * shard].clone().requires_grad_()
        loss = impl(x, target, rank * shard, vocab, reduce_max, reduce_sum, IGNORE)
        loss.backward(dloss)
        return loss.detach(), x.grad

    results = ThreadGroup(world).run(rank_fn)
    for loss, _ in results:
        torch.testing.assert_close(loss, want_loss, **TOL)
    grad = torch.cat([g for _, g in results], dim=1)
    torch.testing.assert_close(grad[:, :vocab], want_grad, **TOL)
    assert torch.all(grad[:, vocab:] == 0)


def _linear_ce_expected(hidden, weight, target, vocab, dloss):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = F.cross_entropy(h @ w[:vocab].t(), target, ignore_index=IGNORE, reduction="none")
    loss.backward(dloss)
    return loss, h.grad, w.grad


@pytest.mark.parametrize("uniform_dloss", [True, False])
def test_fused_linear_cross_entropy_single_device(uniform_dloss):
    """Chunks of 16 over 37 tokens (a ragged last chunk); a padded vocab of 100 + 4."""
    torch.manual_seed(0)
    n, h, vocab = 37, 24, 100
    hidden, weight = torch.randn(n, h), torch.randn(vocab + 4, h) / h**0.5
    target = _targets(n, vocab)
    dloss = torch.full((n,), 1 / n) if uniform_dloss else torch.rand(n)
    want = _linear_ce_expected(hidden, weight, target, vocab, dloss)

    hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(hh, ww, target, vocab_size=vocab, chunk_size=16)
    loss.backward(dloss)
    torch.testing.assert_close(loss, want[0], **TOL)
    torch.testing.assert_close(hh.grad, want[1], **MATMUL_TOL)
    torch.testing.assert_close(ww.grad, want[2], **MATMUL_TOL)  # rows of pad ids: zero


def test_fused_linear_cross_entropy_vocab_parallel():
    """Each rank holds half the (padded) output weight; grad_hidden is summed over ranks
    by the caller's TP mapping, which here is the explicit sum of the two partials."""
    torch.manual_seed(0)
    n, h, vocab, world, shard = 37, 24, 100, 2, 52
    hidden, weight = torch.randn(n, h), torch.randn(world * shard, h) / h**0.5
    target, dloss = _targets(n, vocab), torch.rand(n)
    want_loss, want_dh, want_dw = _linear_ce_expected(hidden, weight, target, vocab, dloss)

    def rank_fn(rank, reduce_max, reduce_sum):
        hh = hidden.clone().requires_grad_()
        ww = weight[rank * shard : (rank + 1) * shard].clone().requires_grad_()
        loss = fused_linear_cross_entropy(
            hh, ww, target, rank * shard, vocab, reduce_max, reduce_sum, IGNORE, chunk_size=16
        )
        loss.backward(dloss)
        return loss.detach(), hh.grad, ww.grad

    results = ThreadGroup(world).run(rank_fn)
    for loss, _, _ in results:
        torch.testing.assert_close(loss, want_loss, **TOL)
    torch.testing.assert_close(sum(dh for _, dh, _ in results), want_dh, **MATMUL_TOL)
    grad_weight = torch.cat([dw for _, _, dw in results])
    torch.testing.assert_close(grad_weight, want_dw, **MATMUL_TOL)  # rows of pad ids: zero


def test_fused_linear_cross_entropy_without_grad_matches_reference():
    torch.manual_seed(0)
    hidden, weight, target = torch.randn(2, 9, 16), torch.randn(50, 16), _targets(18, 50).view(2, 9)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, target, chunk_size=8)
    torch.testing.assert_close(loss, fused_linear_cross_entropy_reference(hidden, weight, target), **TOL)


def test_fused_linear_cross_entropy_under_autocast():
    """Under bf16 autocast (as --bf16 trains) it gives what autocast makes of the unfused
    linear + cross entropy: bf16 matmuls, an fp32 loss and fp32 grads for fp32 leaves. On
    CPU this also runs the bf16 grad_W accumulation without addmm's out_dtype (CUDA-only).
    Tolerance 2e-2: both sides round logits and grads to bf16 (8 bits), in other places."""
    torch.manual_seed(0)
    n, h, vocab = 37, 24, 100
    hidden, weight, target = torch.randn(n, h), torch.randn(vocab, h) / h**0.5, _targets(n, vocab)

    def unfused(hh, ww):
        return cross_entropy(hh @ ww.t(), target)

    def fused(hh, ww):
        return fused_linear_cross_entropy(hh, ww, target, chunk_size=16)

    results = []
    for fn in (unfused, fused):
        hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(hh, ww)
        loss.mean().backward()
        results.append((loss, hh.grad, ww.grad))
    for want, got in zip(*results):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
