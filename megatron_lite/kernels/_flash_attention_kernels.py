"""The Triton programs of FlashAttention-2 (megatron_lite/kernels/flash_attention.py launches them and holds
the public ops): exact attention without the [s, s] score matrix, forward and backward.

Layout is SDPA's: q [b, nh, s, d], k/v [b, nkv, s, d], nh % nkv == 0 (GQA: query head h
reads kv head h // (nh // nkv)).

Forward, per block of BLOCK_M query rows: walk the key/value blocks keeping, per row,
the running max m of the scores, the running sum l of exp(score - m) and the unnormalised
output acc = sum exp(score - m) v. When a block raises the max to m', the old l and acc
are rescaled by exp(m - m') (the online softmax); one division by l at the end. Scores are
kept in base 2 (scaled by log2 e) so every exponential is an exp2. Only O and the row
logsumexp (lse = m + log2 l, base 2 as well) are written: O(s) extra memory, not O(s^2).

Backward recomputes the probabilities block by block from q, k and the saved lse,
P = exp2(q k^T * scale * log2 e - lse), instead of storing them (FA2's trade: a second QK^T
matmul for s^2 memory). With dP = dO V^T and delta = rowsum(dO * O) (= rowsum(P * dP)),
the score gradient is dS = P * (dP - delta), and
    dV = P^T dO,   dK = scale * dS^T Q,   dQ = scale * dS K.
delta is computed first by a small kernel. dK/dV are then computed per key block (looping
over all query blocks and, for GQA, over every query head that shares the kv head, so the
sum over the group needs no atomics), and dQ per query block by a second kernel.

All matmuls accumulate in fp32 (tl.dot's accumulator) and the softmax statistics are fp32:
bf16 probabilities summed over thousands of keys would lose the small terms. P and dS
are cast to the input dtype only as matmul operands, as the tensor cores expect.

Causal masking and the ragged tail (s not a multiple of the block) are applied only in the
blocks that need them (the `MASK` constexpr); full blocks run unmasked. A sliding window
(`window`: each query sees itself and the `window` keys before it, the WINDOWED constexpr)
visits only the key blocks the window reaches, all of them masked; a row that has not yet
reached its window in the first block sees no key there, so the online softmax shifts by 0
instead of its max of -inf.

Document masking (DOCUMENTS, packed sequences): DOC holds, per sample and query row, the first
key of the row's document; keys before it are hidden. Documents are contiguous, so DOC is
non-decreasing along a sample's rows, and a query block skips every key block before its
first row's document (the work saved on packed samples); key blocks between its first and its
last row's document start are masked, those after up to the diagonal run unmasked. dK/dV walk
only the query rows that can see their key block: KEY_END (per key, the first query row whose
document starts after it) ends the walk, and the rows whose document starts at or before the
block's first key run unmasked. A row that sees no key of a block (context parallelism hands
blocks of other documents) gets output 0 and lse -inf, as with a window.
"""
import triton
import triton.language as tl

from megatron_lite.kernels._common import ptr_add


@triton.jit
def _program_tile(n_heads, BLOCK: tl.constexpr):
    """This program's tile: grid axis 0 walks blocks of BLOCK sequence positions, axis 1
    the (batch, head) pairs. Returns (first position, positions, batch, head, pair index)."""
    start = tl.program_id(0) * BLOCK
    bh = tl.program_id(1)
    return start, start + tl.arange(0, BLOCK), bh // n_heads, bh % n_heads, bh


@triton.jit
def _head(T, b, h, stride_b, stride_h):
    """Base pointer of head h of batch b."""
    return ptr_add(ptr_add(T, b, stride_b), h, stride_h)


@triton.jit
def _rows_ptrs(base, rows, stride_s, HEAD_DIM: tl.constexpr):
    """[len(rows), HEAD_DIM] pointers to positions `rows` of one head.

    The head's base pointer already carries the int64 batch/head offset; within a head the
    offsets stay int32 (s * stride_s is below 2**31 for any real layout, e.g. 128k positions
    x 64 heads x 128 dims = 2**30), which keeps the per-element offset math in 32-bit
    registers: int64 offsets for every [block, head_dim] element cost registers and spills.
    """
    return base + rows[:, None] * stride_s + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def _load_rows(base, rows, stride_s, seqlen, HEAD_DIM: tl.constexpr):
    """Positions `rows` of one head; those past the sequence read as zeros."""
    return tl.load(_rows_ptrs(base, rows, stride_s, HEAD_DIM), mask=rows[:, None] < seqlen, other=0.0)


@triton.jit
def _store_rows(base, rows, stride_s, seqlen, value, HEAD_DIM: tl.constexpr):
    tl.store(_rows_ptrs(base, rows, stride_s, HEAD_DIM), value.to(base.dtype.element_ty),
             mask=rows[:, None] < seqlen)


@triton.jit
def _row_stats(LSE, DELTA, bh, rows, seqlen):
    """The saved base-2 logsumexp and delta of query rows `rows` of head `bh`.
    lse = +inf past the sequence makes those rows' recomputed P exactly 0."""
    mask = rows < seqlen
    lse = tl.load(ptr_add(LSE, bh, seqlen) + rows, mask=mask, other=float("inf"))
    delta = tl.load(ptr_add(DELTA, bh, seqlen) + rows, mask=mask, other=0.0)
    return lse, delta


@triton.jit
def _doc_starts(doc_row, rows, seqlen):
    """The first key of each of `rows`' documents (doc_row: this sample's row of DOC). Loaded
    where a block is masked rather than held through the loops: fewer live registers."""
    return tl.load(doc_row + rows, mask=rows < seqlen, other=0)


@triton.jit
def _visible(rows, cols, seqlen, window, doc_row, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
             DOCUMENTS: tl.constexpr):
    """[rows, cols] mask of the keys each query may attend to."""
    ok = cols[None, :] < seqlen
    if CAUSAL:
        ok = ok & (rows[:, None] >= cols[None, :])
    if WINDOWED:
        ok = ok & (rows[:, None] - cols[None, :] <= window)
    if DOCUMENTS:
        ok = ok & (cols[None, :] >= _doc_starts(doc_row, rows, seqlen)[:, None])
    return ok


@triton.jit
def _query_block_kv_ranges(start_m, doc_row, seqlen, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                           DOCUMENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For query rows [start_m, start_m + BLOCK_M): key blocks [lo, mid) need the mask (the
    documents' starts), [mid, split) are fully visible, [split, end) need the mask (the diagonal
    when causal, else the ragged tail; with a window every block from the first the window
    reaches). Key blocks before lo are skipped. Needs BLOCK_M % BLOCK_N == 0, so that start_m is
    a key-block boundary."""
    lo = 0
    if CAUSAL:
        split = start_m
        end = tl.minimum(start_m + BLOCK_M, seqlen)
    else:
        split = (seqlen // BLOCK_N) * BLOCK_N
        end = seqlen
    if WINDOWED:
        lo = tl.maximum(start_m - window, 0) // BLOCK_N * BLOCK_N
        split = lo
    mid = lo
    if DOCUMENTS:  # the document starts do not decrease along the rows: the first and last bound them
        first = tl.maximum(tl.load(doc_row + start_m), 0)
        last = tl.maximum(tl.load(doc_row + tl.minimum(start_m + BLOCK_M, seqlen) - 1), 0)
        lo = tl.maximum(lo, first // BLOCK_N * BLOCK_N)
        mid = tl.maximum(lo, tl.minimum(split, tl.cdiv(last, BLOCK_N) * BLOCK_N))
        split = tl.maximum(split, mid)
    return lo, mid, split, end


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_head, v_head, stride_ks, stride_vs, rows, doc_row, lo, hi, seqlen,
               qk_scale, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, DOCUMENTS: tl.constexpr,
               MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_head, cols, stride_ks, seqlen, HEAD_DIM)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASK:
            s = tl.where(_visible(rows, cols, seqlen, window, doc_row, CAUSAL, WINDOWED, DOCUMENTS), s,
                         float("-inf"))
        # Without a window or documents every row sees a key in each call's first block, so m
        # is finite from then on and exp2(m_i - m_new) never meets -inf - -inf; with one, a row
        # that has seen no key yet shifts by 0 (its p and alpha are then exp2(-inf) = 0).
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        shift = m_new
        if WINDOWED or DOCUMENTS:
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_rows(v_head, cols, stride_vs, seqlen, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, DOC, qk_scale, seqlen, n_heads, group, window,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, DOCUMENTS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m, rows, b, h, bh = _program_tile(n_heads, BLOCK_M)
    q = _load_rows(_head(Q, b, h, sqb, sqh), rows, sqs, seqlen, HEAD_DIM)
    k_head, v_head = _head(K, b, h // group, skb, skh), _head(V, b, h // group, svb, svh)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    doc_row = ptr_add(DOC, b, seqlen)
    lo, mid, split, end = _query_block_kv_ranges(start_m, doc_row, seqlen, window, CAUSAL, WINDOWED, DOCUMENTS,
                                                 BLOCK_M, BLOCK_N)
    if DOCUMENTS:
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_head, v_head, sks, svs, rows, doc_row, lo, mid, seqlen,
                                   qk_scale, window, CAUSAL, WINDOWED, DOCUMENTS, True, HEAD_DIM, BLOCK_N)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_head, v_head, sks, svs, rows, doc_row, mid, split, seqlen,
                               qk_scale, window, CAUSAL, WINDOWED, DOCUMENTS, False, HEAD_DIM, BLOCK_N)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_head, v_head, sks, svs, rows, doc_row, split, end, seqlen,
                               qk_scale, window, CAUSAL, WINDOWED, DOCUMENTS, True, HEAD_DIM, BLOCK_N)
    # A row may see no key (past the end with a window; of another document in a block context
    # parallelism hands): output 0 and lse -inf, not 0/0.
    if WINDOWED or DOCUMENTS:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    _store_rows(_head(OUT, b, h, sob, soh), rows, sos, seqlen, acc / l_i[:, None], HEAD_DIM)
    # Saved in the same base-2 units as the scores, so backward needs no conversion.
    tl.store(ptr_add(LSE, bh, seqlen) + rows, m_i + tl.log2(l_i), mask=rows < seqlen)


@triton.jit
def _bwd_delta_kernel(OUT, DO, DELTA, seqlen, n_heads, sob, soh, sos, sdb, sdh, sds,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    _, rows, b, h, bh = _program_tile(n_heads, BLOCK_M)
    o = _load_rows(_head(OUT, b, h, sob, soh), rows, sos, seqlen, HEAD_DIM).to(tl.float32)
    do = _load_rows(_head(DO, b, h, sdb, sdh), rows, sds, seqlen, HEAD_DIM).to(tl.float32)
    tl.store(ptr_add(DELTA, bh, seqlen) + rows, tl.sum(o * do, axis=1), mask=rows < seqlen)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_head, do_head, LSE, DELTA, doc_row, bh, stride_qs, stride_dos, cols,
                lo, hi, seqlen, qk_scale, window, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOWED: tl.constexpr, DOCUMENTS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # Transposed form: this program owns keys `cols`, so it builds S^T [keys, queries].
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_head, rows, stride_qs, seqlen, HEAD_DIM)
        do = _load_rows(do_head, rows, stride_dos, seqlen, HEAD_DIM)
        lse, delta = _row_stats(LSE, DELTA, bh, rows, seqlen)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale
        if MASK:  # causal diagonal block, the window's edge, or a document's start
            if CAUSAL:
                visible = rows[None, :] >= cols[:, None]
            else:
                visible = rows[None, :] >= 0
            if WINDOWED:
                visible = visible & (rows[None, :] - cols[:, None] <= window)
            if DOCUMENTS:
                visible = visible & (cols[:, None] >= _doc_starts(doc_row, rows, seqlen)[None, :])
            s_t = tl.where(visible, s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, DOC, KEY_END, qk_scale, sm_scale, seqlen, n_heads, n_kv_heads, group, window,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdos,
    sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, DOCUMENTS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n, cols, b, kvh, _ = _program_tile(n_kv_heads, BLOCK_N)
    k = _load_rows(_head(K, b, kvh, skb, skh), cols, sks, seqlen, HEAD_DIM)
    v = _load_rows(_head(V, b, kvh, svb, svh), cols, svs, seqlen, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # Causal: queries before start_n never see these keys; those of the diagonal block see
    # some of them (masked); all later ones see all of them (unmasked). That needs
    # BLOCK_N % BLOCK_M == 0, so that start_n + BLOCK_N is a query-block boundary.
    # The ragged tail needs no mask here: queries past the end load as zeros with lse = +inf
    # (so P = 0), and keys past the end are this program's own rows, which are not stored.
    # With a window (causal) the queries after start_n + BLOCK_N - 1 + window see none of
    # these keys, and every block up to there is masked.
    # With documents the rows from KEY_END of the block's last key on see none of its keys,
    # and only the rows before KEY_END of its first key see all of them: the unmasked rows end
    # at the last whole query block of those, the masked ones at `stop`.
    if CAUSAL:
        unmasked_lo = tl.minimum(start_n + BLOCK_N, seqlen)
    else:
        unmasked_lo = 0
    unmasked_hi = seqlen
    if WINDOWED:
        unmasked_lo = tl.minimum(start_n + BLOCK_N + window, seqlen)
        unmasked_hi = unmasked_lo
    diagonal_hi, stop = unmasked_lo, unmasked_hi
    doc_row = ptr_add(DOC, b, seqlen)
    if DOCUMENTS:
        key_end = ptr_add(KEY_END, b, seqlen)
        stop = tl.minimum(stop, tl.load(key_end + tl.minimum(start_n + BLOCK_N, seqlen) - 1))
        diagonal_hi = tl.minimum(diagonal_hi, stop)
        all_visible_hi = tl.load(key_end + start_n) // BLOCK_M * BLOCK_M
        unmasked_hi = tl.maximum(unmasked_lo, tl.minimum(unmasked_hi, all_visible_hi))
    for h in range(kvh * group, (kvh + 1) * group):  # every query head sharing this kv head
        q_head, do_head = _head(Q, b, h, sqb, sqh), _head(DO, b, h, sdob, sdoh)
        bh = b * n_heads + h
        if CAUSAL:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_head, do_head, LSE, DELTA, doc_row, bh, sqs, sdos, cols,
                                 start_n, diagonal_hi, seqlen, qk_scale, window, True, CAUSAL, WINDOWED,
                                 DOCUMENTS, HEAD_DIM, BLOCK_M)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_head, do_head, LSE, DELTA, doc_row, bh, sqs, sdos, cols,
                             unmasked_lo, unmasked_hi, seqlen, qk_scale, window, False, CAUSAL, WINDOWED,
                             DOCUMENTS, HEAD_DIM, BLOCK_M)
        if DOCUMENTS:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_head, do_head, LSE, DELTA, doc_row, bh, sqs, sdos, cols,
                                 unmasked_hi, stop, seqlen, qk_scale, window, True, CAUSAL, WINDOWED,
                                 DOCUMENTS, HEAD_DIM, BLOCK_M)
    _store_rows(_head(DK, b, kvh, sdkb, sdkh), cols, sdks, seqlen, dk * sm_scale, HEAD_DIM)
    _store_rows(_head(DV, b, kvh, sdvb, sdvh), cols, sdvs, seqlen, dv, HEAD_DIM)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_head, v_head, stride_ks, stride_vs, rows, doc_row, lo, hi, seqlen,
              qk_scale, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, DOCUMENTS: tl.constexpr,
              MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_head, cols, stride_ks, seqlen, HEAD_DIM)
        v = _load_rows(v_head, cols, stride_vs, seqlen, HEAD_DIM)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASK:
            s = tl.where(_visible(rows, cols, seqlen, window, doc_row, CAUSAL, WINDOWED, DOCUMENTS), s,
                         float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, DOC, qk_scale, sm_scale, seqlen, n_heads, group, window,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdos, sdqb, sdqh, sdqs,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, DOCUMENTS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m, rows, b, h, bh = _program_tile(n_heads, BLOCK_M)
    q = _load_rows(_head(Q, b, h, sqb, sqh), rows, sqs, seqlen, HEAD_DIM)
    do = _load_rows(_head(DO, b, h, sdob, sdoh), rows, sdos, seqlen, HEAD_DIM)
    lse, delta = _row_stats(LSE, DELTA, bh, rows, seqlen)
    k_head, v_head = _head(K, b, h // group, skb, skh), _head(V, b, h // group, svb, svh)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    doc_row = ptr_add(DOC, b, seqlen)
    lo, mid, split, end = _query_block_kv_ranges(start_m, doc_row, seqlen, window, CAUSAL, WINDOWED, DOCUMENTS,
                                                 BLOCK_M, BLOCK_N)
    if DOCUMENTS:
        dq = _dq_inner(dq, q, do, lse, delta, k_head, v_head, sks, svs, rows, doc_row, lo, mid, seqlen,
                       qk_scale, window, CAUSAL, WINDOWED, DOCUMENTS, True, HEAD_DIM, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_head, v_head, sks, svs, rows, doc_row, mid, split, seqlen,
                   qk_scale, window, CAUSAL, WINDOWED, DOCUMENTS, False, HEAD_DIM, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_head, v_head, sks, svs, rows, doc_row, split, end, seqlen,
                   qk_scale, window, CAUSAL, WINDOWED, DOCUMENTS, True, HEAD_DIM, BLOCK_N)
    _store_rows(_head(DQ, b, h, sdqb, sdqh), rows, sdqs, seqlen, dq * sm_scale, HEAD_DIM)
