"""Causal attention of this rank's queries over the whole sequence when the sequence is split over cp.

Each rank holds the zigzag chunks (r, 2*cp-1-r) of q, k and v ([batch, heads, 2 chunks, dim],
after RoPE at the true positions). Three ways to see every key (Megatron's --cp-comm-type):

- p2p, ring attention: the k/v of each rank travel once around the cp ring. At each step a rank
  attends with its queries to the block it holds while the next block is already in flight;
  the partial results merge exactly through their log-sum-exp. Backward sends the blocks round
  again, each followed by the accumulator of its dK/dV, which arrives home after cp hops.
  Traffic per layer: (cp-1) k/v blocks forward, (cp-1) k/v blocks and cp dK/dV blocks backward.
- allgather (Llama 3): all-gather k/v, attend locally, reduce-scatter dK/dV. Backward gathers
  again rather than keeping the whole sequence's k/v alive between forward and backward.
- a2a (Ulysses): all-to-all from sequence-split to head-split (each rank gets the whole
  sequence for heads/cp heads), plain causal attention, all-to-all back. Needs heads and
  query groups divisible by tp*cp.

p2p and allgather work on chunk pairs: query chunk i and key chunk j are fully visible when
j < i, causal when j == i, skipped when j > i. With a sliding window a pair j < i is masked by
its distance (i - j) * chunk length, and skipped when the window reaches none of it. With a
document mask (`doc_start`, each local token's document start in the whole sequence) a pair
j < i is masked by the documents, and skipped when no query of chunk i (in any sample) belongs
to a document that began by the end of chunk j. A pair is
one call of the block primitives the model's ops provide (`attention_block_forward` /
`attention_block_backward`: the flash-attention kernels on GPU, their torch references on CPU),
which return and take the row log-sum-exp.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from megatron_lite import parallel_state
from megatron_lite.comm import all_gather, all_to_all, reduce_scatter, send_recv, send_recv_async
from megatron_lite.context_parallel.zigzag import chunk_ids, zigzag_positions

Tensor = torch.Tensor
# (q, k, v, causal, window=, offset=) and (q, k, v, out, lse, dout, causal, window=, offset=).
BlockForward = Callable[..., tuple[Tensor, Tensor]]
BlockBackward = Callable[..., tuple[Tensor, Tensor, Tensor]]
KV_TAG, DKV_TAG = 3, 4  # apart from the pipeline's tags (1, 2): both use the default group


def _chunk(t: Tensor, i: int, dim: int = -2) -> Tensor:
    """Chunk i of the two a rank holds along the sequence dimension."""
    return t.narrow(dim, i * (t.shape[dim] // 2), t.shape[dim] // 2)


def _pairs(q_ids: tuple[int, int], k_ids: tuple[int, int], chunk: int, window: int | None,
           doc_lows: tuple[int, int] | None = None):
    """(query chunk index, key chunk index, causal, offset) of every chunk pair some query of
    which sees some key: offset is how far the query chunk starts after the key chunk.
    `doc_lows`: the earliest document start among each query chunk's tokens (None: no documents)."""
    for i, q_id in enumerate(q_ids):
        for j, k_id in enumerate(k_ids):
            offset = (q_id - k_id) * chunk
            if (k_id <= q_id and (window is None or offset - (chunk - 1) <= window)
                    and (doc_lows is None or doc_lows[i] < (k_id + 1) * chunk)):
                yield i, j, k_id == q_id, offset


class _Merged:
    """Running output and log-sum-exp of each local query chunk over the key blocks seen so far."""

    def __init__(self) -> None:
        self.out: list[Tensor | None] = [None, None]
        self.lse: list[Tensor | None] = [None, None]

    def add(self, i: int, out: Tensor, lse: Tensor) -> None:
        out = out.float()
        if self.out[i] is None:
            self.out[i], self.lse[i] = out, lse
            return
        new = torch.logaddexp(self.lse[i], lse)
        # A row no block has shown a key yet (a sliding window's) stays lse -inf, weight 0.
        unseen = new == float("-inf")
        weight_old = torch.exp(self.lse[i] - new).masked_fill(unseen, 0.0)[..., None]
        weight_new = torch.exp(lse - new).masked_fill(unseen, 0.0)[..., None]
        self.out[i] = self.out[i] * weight_old + out * weight_new
        self.lse[i] = new

    def result(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return torch.cat(self.out, dim=-2).to(dtype), torch.cat(self.lse, dim=-1)


class _Masks:
    """What limits which keys each local query sees: the window, and the documents (doc_start
    [b, 2 * chunk], in whole-sequence positions, with the earliest of each query chunk, read
    once per attention so that every pair's skip costs no device sync)."""

    def __init__(self, window: int | None, doc_start: Tensor | None) -> None:
        self.window, self.doc_start = window, doc_start
        self.doc_lows = None if doc_start is None else tuple(int(_chunk(doc_start, i, -1).min()) for i in (0, 1))

    def pairs(self, q: Tensor, k_ids: tuple[int, int]):
        """_pairs of this rank's query chunks with the key chunks k_ids, each with its block's
        masks: the window and offset, and doc_start in the key chunk's positions."""
        grid = parallel_state.get_grid()
        chunk = q.shape[-2] // 2
        for i, j, causal, offset in _pairs(chunk_ids(grid.index("cp"), grid.size("cp")), k_ids, chunk, self.window,
                                           self.doc_lows):
            doc_start = None if self.doc_start is None else _chunk(self.doc_start, i, -1) - k_ids[j] * chunk
            yield i, j, causal, dict(window=self.window, offset=offset, doc_start=doc_start)


def _forward_blocks(forward: BlockForward, q: Tensor, kv: Tensor, k_ids: tuple[int, int], merged: _Merged,
                    masks: _Masks) -> None:
    """Attend with the local queries to one rank's k/v chunk pair (kv = stack of k and v)."""
    for i, j, causal, block in masks.pairs(q, k_ids):
        merged.add(i, *forward(_chunk(q, i), _chunk(kv[0], j), _chunk(kv[1], j), causal, **block))


def _backward_blocks(backward: BlockBackward, q: Tensor, kv: Tensor, k_ids: tuple[int, int], out: Tensor,
                     lse: Tensor, dout: Tensor, dq: Tensor, dkv: Tensor, masks: _Masks) -> None:
    """Add one k/v chunk pair's share of the gradients to dq (local) and dkv (that pair's)."""
    for i, j, causal, block in masks.pairs(q, k_ids):
        grads = backward(_chunk(q, i), _chunk(kv[0], j), _chunk(kv[1], j), _chunk(out, i), _chunk(lse, i, -1),
                         _chunk(dout, i), causal, **block)
        _chunk(dq, i).add_(grads[0])
        _chunk(dkv[0], j).add_(grads[1])
        _chunk(dkv[1], j).add_(grads[2])


def _save_for_backward(ctx, q: Tensor, k: Tensor, v: Tensor, merged: _Merged, backward: BlockBackward,
                       masks: _Masks) -> Tensor:
    """The merged output; keeps what the backward of a chunk-pair attention needs (only this
    rank's q, k, v: the others' k/v are fetched again rather than kept alive)."""
    out, lse = merged.result(q.dtype)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.backward_block, ctx.masks = backward, masks
    return out


def _ring() -> tuple[int, int, int, int]:
    grid = parallel_state.get_grid()
    cp, r, ring = grid.size("cp"), grid.index("cp"), grid.members("cp")
    return cp, r, ring[(r + 1) % cp], ring[(r - 1) % cp]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, forward: BlockForward, backward: BlockBackward,
                masks: _Masks) -> Tensor:
        cp, r, nxt, prv = _ring()
        kv, owner, merged = torch.stack([k, v]), r, _Merged()
        for step in range(cp):
            pending, incoming = [], None
            if step < cp - 1:  # the next block travels while this one is computed
                incoming = torch.empty_like(kv)
                pending = send_recv_async([("send", kv, nxt, KV_TAG), ("recv", incoming, prv, KV_TAG)], "cp")
            _forward_blocks(forward, q, kv, chunk_ids(owner, cp), merged, masks)
            for work in pending:
                work.wait()
            if incoming is not None:
                kv, owner = incoming, (owner - 1) % cp
        return _save_for_backward(ctx, q, k, v, merged, backward, masks)

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        cp, r, nxt, prv = _ring()
        kv, owner = torch.stack([k, v]), r
        dq, dkv = torch.zeros_like(q, dtype=torch.float32), torch.zeros_like(kv, dtype=torch.float32)
        for step in range(cp):
            pending, incoming = [], None
            if step < cp - 1:
                incoming = torch.empty_like(kv)
                pending = send_recv_async([("send", kv, nxt, KV_TAG), ("recv", incoming, prv, KV_TAG)], "cp")
            _backward_blocks(ctx.backward_block, q, kv, chunk_ids(owner, cp), out, lse, dout, dq, dkv, ctx.masks)
            # This block's dK/dV follow it; after the last step our own block's come home.
            arrived = torch.empty_like(dkv)
            send_recv([("send", dkv, nxt, DKV_TAG), ("recv", arrived, prv, DKV_TAG)], "cp")
            dkv = arrived
            for work in pending:
                work.wait()
            if incoming is not None:
                kv, owner = incoming, (owner - 1) % cp
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def _gather_kv(k: Tensor, v: Tensor) -> Tensor:
    """[cp, 2, ...]: every cp rank's stacked k and v, in the group's rank order."""
    return all_gather(torch.stack([k, v]).unsqueeze(0), dim=0, group="cp")


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, forward: BlockForward, backward: BlockBackward,
                masks: _Masks) -> Tensor:
        cp, merged = parallel_state.get_grid().size("cp"), _Merged()
        for owner, kv in enumerate(_gather_kv(k, v)):
            _forward_blocks(forward, q, kv, chunk_ids(owner, cp), merged, masks)
        return _save_for_backward(ctx, q, k, v, merged, backward, masks)

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        cp = parallel_state.get_grid().size("cp")
        full = _gather_kv(k, v)
        dq, dfull = torch.zeros_like(q, dtype=torch.float32), torch.zeros_like(full, dtype=torch.float32)
        for owner in range(cp):
            _backward_blocks(ctx.backward_block, q, full[owner], chunk_ids(owner, cp), out, lse, dout, dq,
                             dfull[owner], ctx.masks)
        dkv = reduce_scatter(dfull, dim=0, group="cp")[0]
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


class _AllToAll(torch.autograd.Function):
    """all_to_all over cp going forward, its inverse going back."""

    @staticmethod
    def forward(ctx, x: Tensor, split_dim: int, concat_dim: int) -> Tensor:
        ctx.dims = split_dim, concat_dim
        return all_to_all(x, split_dim, concat_dim, "cp")

    @staticmethod
    def backward(ctx, grad: Tensor):
        split_dim, concat_dim = ctx.dims
        return all_to_all(grad, concat_dim, split_dim, "cp"), None, None


@functools.cache
def _ulysses_order(seq: int, cp: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """After the exchange the sequence is every rank's zigzag pair in rank order: the permutation
    that sorts it (for a plain causal mask) and its inverse. Computed once per shape, not per layer."""
    held = torch.cat([zigzag_positions(seq, cp, rank, device) for rank in range(cp)])
    to_order = torch.argsort(held)
    return to_order, torch.argsort(to_order)


def _ulysses(q: Tensor, k: Tensor, v: Tensor, attention: Callable[..., Tensor], window: int | None,
             doc_start: Tensor | None) -> Tensor:
    cp = parallel_state.get_grid().size("cp")
    to_order, back = _ulysses_order(q.shape[2] * cp, cp, q.device)
    q, k, v = (_AllToAll.apply(t, 1, 2).index_select(2, to_order) for t in (q, k, v))
    if doc_start is not None:  # the whole sequence's document starts, as its heads now hold it
        doc_start = all_gather(doc_start, dim=1, group="cp").index_select(1, to_order)
    return _AllToAll.apply(attention(q, k, v, 0.0, window, doc_start).index_select(2, back), 2, 1)


def context_parallel_attention(comm_type: str, attention: Callable[..., Tensor], block_forward: BlockForward,
                               block_backward: BlockBackward) -> Callable[..., Tensor]:
    """The attention op of a model whose sequence is split over cp (signature of Ops.attention;
    attention dropout is refused with cp > 1 by the config)."""
    def cp_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, window: int | None = None,
                     doc_start: Tensor | None = None) -> Tensor:
        if comm_type == "a2a":
            return _ulysses(q, k, v, attention, window, doc_start)
        function = _RingAttention if comm_type == "p2p" else _AllGatherAttention
        return function.apply(q, k, v, block_forward, block_backward, _Masks(window, doc_start))
    return cp_attention
