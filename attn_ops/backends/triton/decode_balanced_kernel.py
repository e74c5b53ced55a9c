"""Paged attention of one query (a decode) or a few (speculative verification, decode rows through
``attn.prefill``) per sequence, with the batch's keys dealt out evenly over the programs, so that
a long sequence among short ones is spread over as many programs as its keys need.

Why: the split kernel (decode_kernel.py) gives every sequence the same split count, fixed by
static shapes (the block table's width), and each split a share of its own sequence's keys. In a
serving batch the lengths differ: with one 16k-token sequence among fifteen of 1k at B 16 (one
split, 128 programs), the long sequence's 8 programs each walk 16k keys alone while the other
SMs idle. Here the same number of programs shares the whole batch's key tiles equally.

Work, computed on the device from ``seqlens_k`` (no host sync, a static grid):
- each (sequence b, kv head h) pair has ``n_b = cdiv(visible keys, BLOCK_N)`` key tiles; the
  pairs are laid out sequence-major, then by kv head, so the batch's ``T = Hkv * sum(n_b)`` tiles
  form one range;
- program p of P takes the next ``T // P`` tiles, one more when ``p < T % P``, and walks the
  pairs they cross (:func:`.decode_keys.attend_keys` on each piece). A pair all of whose tiles
  fall to one program is written directly. A piece of a pair leaves a normalised partial and its
  log2-sum-exp in its program's slot 0 (the piece holding the program's first tile) or slot 1
  (a piece that starts a pair and runs past the program's range), and the piece that completes
  the pair's tile count merges them (:func:`.merge_kernel.merge_pieces`);
- a sequence with no visible key gets zeros (lse -inf) from program ``b mod P`` (a decode).

A few queries per sequence (``QUERIES``; the unified kernel's plan takes it, unified_plan.
balanced_plan): the same scheme over ``lq * G`` packed rows (query-major, as the unified
kernel's), its lengths from cu_seqlens. The tiles dealt out hold the keys every row sees (``lk -
lq + 1`` under the causal mask); the piece holding a pair's last tile first takes the few keys
only some rows see (:func:`.softmax.attend_diagonal`, with its isolation of non-finite values),
before its walk, so none of that code's values is live through the walk's loop. A pair with no
such tile (``lk < lq``, or no key) is one tile whose walk is empty. Measured on the H200 (B 16 of
one 16384-key sequence and 15 of 1024, 4 queries each): 56.4 us against the unified kernel's
243.9; uniform lengths cost 5-7% (BENCHMARKS.md, sixteenth pass).

With uniform lengths and P = the split kernel's ``S * Hkv * B``, each program takes exactly
one split's tiles (when S divides n), so the work matches the split kernel's. The price is
registers: LLVM hoists the key walk's shared-memory addresses (about 100 values per thread:
base plus constant, derived from the thread id) out of the loop over pieces, so they stay live
through every piece's stores and merge (166 per thread at the default row against the split
kernel's 126, 128 without the loop; 236 at the WIDE row against 186), and
decode_plan.balanced_default takes it only at rows of 1-2 programs per SM.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attn_ops.backends.triton.common import gdc_wait
from attn_ops.backends.triton.decode_keys import attend_keys
from attn_ops.backends.triton.merge_kernel import merge_pieces
from attn_ops.backends.triton.softmax import attend_diagonal, finish, kv_scales, store_lse


@triton.jit(do_not_specialize=["window_left", "batch", "total_q"])
def decode_balanced_kernel(Q, K, V, SEQLENS, TABLE, OUT, O_PART, LSE_PART, SEMA, LSE,
                           SINK_LOGITS, K_SCALE, V_SCALE, CU_Q,
                           stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb,
                           stride_vt, stride_vh, stride_sl, stride_tb, stride_tc, stride_ob,
                           stride_oh, stride_sk, stride_ks, stride_vs, batch, num_kv_heads,
                           qk_scale, cap_log2, cap_inv, window_left, stride_cq, total_q,
                           GROUP: tl.constexpr, G_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                           D_P2: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                           B_P2: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                           DOT: tl.constexpr, HAS_SINKS: tl.constexpr, FP8: tl.constexpr,
                           WITH_LSE: tl.constexpr, FP8_VIA_F16: tl.constexpr = False,
                           FP8_PAIRS: tl.constexpr = False, PAIR_ASM: tl.constexpr = False,
                           R_P2: tl.constexpr = 1, CHUNK: tl.constexpr = 4,
                           QUERIES: tl.constexpr = False, CAUSAL: tl.constexpr = True,
                           ZEROS_FIRST: tl.constexpr = False,
                           KV_SAME_STRIDES: tl.constexpr = False, PDL: tl.constexpr = False):
    """Grid ``(P,)``. A decode (``QUERIES`` False): shapes as decode_kernel's split kernel,
    ``batch`` sequences (at most ``B_P2``) of one query each, lengths ``SEQLENS``; O_PART float32
    ``[P * 2 * GROUP, HEAD_DIM]`` and LSE_PART float32 ``[P * 2 * GROUP]`` (two slots per
    program), SEMA one zeroed int32 counter per (sequence, kv head); CU_Q, stride_cq and total_q
    unused.

    A few queries per sequence (``QUERIES``; unified_kernel's small path, paged, no window):
    Q / OUT ``[total_q, H, D]`` packed by ``CU_Q`` (cu_seqlens_q), SEQLENS is cu_seqlens_k, the
    ``lq * GROUP`` rows of a (sequence, kv head) pair (at most G_P2 = R_P2) packed query-major
    as the unified kernel's, ``CAUSAL`` aligned bottom-right; the slots hold G_P2 rows each. The
    key tiles dealt out are the keys every row sees (``lk - lq + 1`` under ``CAUSAL``); the piece
    with a pair's last tile also takes the few keys only some rows see
    (:func:`.softmax.attend_diagonal`), and a pair with no full tile (``lk < lq``, or no key) is
    one tile whose walk is empty. Rows past ``CU_Q[batch]`` are zeroed.

    ``ZEROS_FIRST`` (a decode): the sequences with no visible key are zeroed before the walk,
    not after it. Where the lse is written, after the walk the lse's store made ptxas schedule
    the key loop's MMAs one chain at a time at the WIDE row (sm_90a: 952 instructions per
    128-key step against 927, 27 NOPs against 2; H200, B 16 x 4096: decode_with_lse 75.3 us
    against decode's 69.7); before it, the DEEP row's build took 168 registers and spilled
    (24-32 bytes, against 204 and none). decode_plan.zeros_first says where."""
    if PDL:  # a programmatic dependent launch: nothing is read before the kernel before it ends
        gdc_wait()
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    num_heads = num_kv_heads * GROUP
    SLOT_ROWS: tl.constexpr = G_P2 if QUERIES else GROUP

    offs_b = tl.arange(0, B_P2)
    b_ok = offs_b < batch
    lens = tl.load(SEQLENS + offs_b.to(tl.int64) * stride_sl, mask=b_ok, other=0)
    firsts = tl.zeros([B_P2], dtype=tl.int32)
    if QUERIES:  # lengths from cu_seqlens; the tiles hold the keys every row sees
        lens = tl.load(SEQLENS + (offs_b + 1).to(tl.int64) * stride_sl, mask=b_ok, other=0) - lens
        lqs = (tl.load(CU_Q + (offs_b + 1).to(tl.int64) * stride_cq, mask=b_ok, other=0)
               - tl.load(CU_Q + offs_b.to(tl.int64) * stride_cq, mask=b_ok, other=0))
        every = lens
        if CAUSAL:
            every = lens - lqs + 1
        tiles = _few_query_tiles(every, lqs, BLOCK_N)
        owned = tl.load(CU_Q + batch * stride_cq)  # rows past it: zeroed at the end
    else:
        if WINDOW:  # the query (position len - 1) sees keys >= len - 1 - window_left
            firsts = tl.maximum(lens - 1 - window_left, 0)
        tiles = tl.cdiv(lens - firsts, BLOCK_N)  # per (sequence, kv head); 0 for an empty one
    ends = tl.cumsum(tiles, 0) * num_kv_heads  # each sequence's end in the range (int32: the
    total = tl.max(ends, 0)  # host checks that the table's capacity keeps it below 2^31)
    # Program p takes q tiles, and one more when p < r: int32 divisions only (an int64 division
    # is a software loop, and this prologue is on every program's critical path).
    q = total // progs
    r = total % progs
    start = pid * q + tl.minimum(pid, r)
    stop = start + q + (pid < r).to(tl.int32)

    offs_g = tl.arange(0, G_P2)
    offs_d = tl.arange(0, D_P2)
    g_ok = offs_g < GROUP
    dim_ok = offs_d < HEAD_DIM
    out_mask = g_ok[:, None] & dim_ok[None, :]
    if ZEROS_FIRST and not QUERIES:  # (ZEROS_FIRST: see the kernel's docstring)
        _zero_unseen(OUT, LSE, tiles, offs_b, offs_g, offs_d, g_ok, out_mask, pid, progs, batch,
                     num_kv_heads, num_heads, stride_ob, stride_oh, GROUP, G_P2, D_P2, WITH_LSE)
    rows = tl.arange(0, R_P2)
    x = start
    while x < stop:
        seq = tl.sum((ends <= x).to(tl.int32), 0)  # the sequence holding tile x
        # Its lengths read again (an L1 hit) rather than picked out of the vectors: two
        # reductions per piece, not five (skewed batches ~0.5% faster, H200).
        q_start, lq, seq_len, first, seen = _sequence(SEQLENS, CU_Q, seq, stride_sl, stride_cq,
                                                      window_left, QUERIES, CAUSAL, WINDOW)
        if QUERIES:
            n = _few_query_tiles(seen, lq, BLOCK_N)
        else:
            n = tl.cdiv(seen - first, BLOCK_N)
        seq_begin = tl.sum(tl.where(ends <= x, tiles, 0), 0) * num_kv_heads
        kv_head = (x - seq_begin) // n
        pair_a = seq_begin + kv_head * n  # the pair's tiles: [pair_a, pair_b)
        pair_b = pair_a + n
        piece_end = tl.minimum(stop, pair_b)
        lo = first + (x - pair_a) * BLOCK_N
        hi = tl.minimum(first + (piece_end - pair_a) * BLOCK_N, seen)
        tokens, heads, rows_ok = _rows(q_start, lq, kv_head, offs_g, GROUP, QUERIES)
        acc = tl.zeros([G_P2, D_P2], dtype=tl.float32)
        m_i = tl.full([G_P2], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([G_P2], dtype=tl.float32)
        if QUERIES and CAUSAL:
            # The keys only some rows see, first where the piece holds the pair's last tile:
            # before the walk, none of its values is live through the walk's loop. (With it
            # after the walk, and a separate pass for pairs without a full tile, sm_90a took
            # 1020 instructions per 128-key step at the WIDE row; like this 963; the decode
            # build 927.)
            if (piece_end == pair_b) & (seen < seq_len):
                acc, m_i, l_i = _diagonal(
                    acc, m_i, l_i, Q, K, V, TABLE, K_SCALE, V_SCALE,
                    tokens * stride_qb + heads * stride_qh, rows_ok, offs_g, dim_ok, seq,
                    kv_head, tl.maximum(seen, 0), seq_len, lq, stride_kb, stride_kt, stride_kh,
                    stride_vb, stride_vt, stride_vh, stride_tb, stride_tc, stride_ks, stride_vs,
                    qk_scale, cap_log2, cap_inv, GROUP, HEAD_DIM, D_P2, PAGE, SOFTCAP, DOT, FP8,
                    KV_SAME_STRIDES)
        acc, m_i, l_i, v_scale = attend_keys(
            acc, m_i, l_i, Q, K, V, TABLE, K_SCALE, V_SCALE, tokens * stride_qb
            + heads * stride_qh, seq, kv_head, rows_ok, dim_ok, lo, hi, stride_kb, stride_kt,
            stride_kh, stride_vb, stride_vt, stride_vh, stride_tb, stride_tc, stride_ks,
            stride_vs, qk_scale, cap_log2, cap_inv, G_P2, HEAD_DIM, D_P2, PAGE, BLOCK_N, SOFTCAP,
            DOT, FP8, FP8_VIA_F16, FP8_PAIRS, PAIR_ASM, KV_SAME_STRIDES)
        # One normalisation for both ends (one product of the accumulator live, not two): a
        # piece's partial leaves the sink out (it joins once, at the merge), which a sink of
        # -inf does exactly.
        whole = (x == pair_a) & (piece_end == pair_b)
        sink2 = 0.0
        if HAS_SINKS:
            sink2 = tl.load(SINK_LOGITS + heads * stride_sk, mask=rows_ok, other=0.0)
            sink2 = tl.where(whole, sink2 * 1.4426950408889634, float("-inf"))  # log2(e)
        factor, lse2 = finish(m_i, l_i, sink2, v_scale, HAS_SINKS)
        # The pair's rows only (R_P2 of the MMA's G_P2): the stores' pointer and mask tiles
        # are what the registers go to at this point, with the loop's invariants still live.
        o = _first_rows(acc * factor[:, None], G_P2, R_P2)
        lse2 = tl.reshape(_first_rows(lse2[:, None], G_P2, R_P2), [R_P2])
        r_tokens, r_heads, r_ok = _rows(q_start, lq, kv_head, rows, GROUP, QUERIES)
        r_mask = r_ok[:, None] & dim_ok[None, :]
        if whole:  # the whole pair: written here
            tl.store(OUT + (r_tokens * stride_ob + r_heads * stride_oh)[:, None]
                     + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=r_mask)
            store_lse(LSE, r_tokens * num_heads + r_heads, lse2, r_ok, WITH_LSE)
        else:  # a piece: its partial, in slot 0 when it holds the program's first tile
            part = (pid.to(tl.int64) * 2 + (x != start).to(tl.int64)) * SLOT_ROWS + rows
            tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=r_mask)
            tl.store(LSE_PART + part, lse2, mask=r_ok)
            # The pair's pieces: programs _owner(pair_a) .. _owner(pair_b - 1).
            p_first = _owner(pair_a, q, r)
            p_last = _owner(pair_b - 1, q, r)
            first_slot = (p_first * q + tl.minimum(p_first, r) != pair_a).to(tl.int32)
            merge_pieces(SEMA, seq * num_kv_heads + kv_head, piece_end - x, n, O_PART,
                         LSE_PART, OUT, LSE, SINK_LOGITS, q_start, kv_head * GROUP, lq * GROUP,
                         num_heads, p_first, first_slot, p_last - p_first + 1, q, r, stride_ob,
                         stride_oh, stride_sk, GROUP, SLOT_ROWS, R_P2, HEAD_DIM, D_P2, CHUNK,
                         HAS_SINKS, WITH_LSE)
        x = piece_end

    if QUERIES:
        if pid == progs - 1:  # rows no sequence owns: zeros, lse -inf
            for token in range(owned, total_q):
                for g in range(0, num_kv_heads):
                    heads = g * GROUP + offs_g
                    row = tl.cast(token, tl.int64)
                    tl.store(OUT + row * stride_ob + heads[:, None] * stride_oh
                             + offs_d[None, :], tl.zeros([G_P2, D_P2], OUT.dtype.element_ty),
                             mask=out_mask)
                    store_lse(LSE, row * num_heads + heads,
                              tl.full([G_P2], float("-inf"), dtype=tl.float32), g_ok, WITH_LSE)
    elif not ZEROS_FIRST:
        _zero_unseen(OUT, LSE, tiles, offs_b, offs_g, offs_d, g_ok, out_mask, pid, progs, batch,
                     num_kv_heads, num_heads, stride_ob, stride_oh, GROUP, G_P2, D_P2, WITH_LSE)


@triton.jit
def _zero_unseen(OUT, LSE, tiles, offs_b, offs_g, offs_d, g_ok, out_mask, pid, progs, batch,
                 num_kv_heads, num_heads, stride_ob, stride_oh, GROUP: tl.constexpr,
                 G_P2: tl.constexpr, D_P2: tl.constexpr, WITH_LSE: tl.constexpr):
    """A decode's sequences with no visible key (length 0, or padding; ``tiles`` [B_P2] 0), taken
    by program ``b mod P``: zeros, and lse -inf."""
    for b in range(pid, batch, progs.to(tl.int32)):
        if tl.sum(tl.where(offs_b == b, tiles, 0), 0) == 0:
            row = tl.cast(b, tl.int64)
            for g in range(0, num_kv_heads):
                heads = g * GROUP + offs_g
                tl.store(OUT + row * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                         tl.zeros([G_P2, D_P2], OUT.dtype.element_ty), mask=out_mask)
                store_lse(LSE, row * num_heads + heads,
                          tl.full([G_P2], float("-inf"), dtype=tl.float32), g_ok, WITH_LSE)


@triton.jit
def _sequence(SEQLENS, CU_Q, seq, stride_sl, stride_cq, window_left, QUERIES: tl.constexpr,
              CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """``(q_start, lq, lk, first, seen)`` of sequence ``seq``: its first query token and query
    count (a decode: ``seq`` and 1), its key count, and the keys every row sees, ``first ..
    seen - 1``."""
    if QUERIES:
        k_start = tl.load(SEQLENS + seq.to(tl.int64) * stride_sl)
        seq_len = tl.load(SEQLENS + (seq + 1).to(tl.int64) * stride_sl) - k_start
        q_start = tl.load(CU_Q + seq.to(tl.int64) * stride_cq)
        lq = tl.load(CU_Q + (seq + 1).to(tl.int64) * stride_cq) - q_start
    else:
        seq_len = tl.load(SEQLENS + seq.to(tl.int64) * stride_sl)
        q_start = seq
        lq = 1
    seen = seq_len
    if QUERIES and CAUSAL:  # bottom-right: query i sits at key i + lk - lq
        seen = seq_len - lq + 1
    first = 0
    if WINDOW:  # (decode only) the query sees keys >= len - 1 - window_left
        first = tl.maximum(seq_len - 1 - window_left, 0)
    return q_start, lq, seq_len, first, seen


@triton.jit
def _rows(q_start, lq, kv_head, idx, GROUP: tl.constexpr, QUERIES: tl.constexpr):
    """``(tokens, heads, valid)`` of packed rows ``idx`` of a (sequence, kv head) pair: row i is
    query token ``q_start + i // GROUP``, head ``kv_head * GROUP + i % GROUP`` (a decode: the
    token ``q_start``, heads ``kv_head * GROUP + i``); valid below ``lq * GROUP``."""
    if QUERIES:
        return ((q_start + idx // GROUP).to(tl.int64), kv_head * GROUP + idx % GROUP,
                idx < lq * GROUP)
    else:
        return q_start.to(tl.int64), kv_head * GROUP + idx, idx < GROUP


@triton.jit
def _diagonal(acc, m_i, l_i, Q, K, V, TABLE, K_SCALE, V_SCALE, q_rows, rows_ok, offs_g, dim_ok,
              seq, kv_head, lo, seq_len, lq, stride_kb, stride_kt, stride_kh, stride_vb,
              stride_vt, stride_vh, stride_tb, stride_tc, stride_ks, stride_vs, qk_scale,
              cap_log2, cap_inv, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
              D_P2: tl.constexpr, PAGE: tl.constexpr, SOFTCAP: tl.constexpr, DOT: tl.constexpr,
              FP8: tl.constexpr, KV_SAME_STRIDES: tl.constexpr):
    """The running softmax of a pair's rows (at element offsets ``q_rows`` of Q) after its keys
    ``lo .. seq_len - 1``, which only some of them see under the causal mask, with isolation
    (:func:`.softmax.attend_diagonal`; q as stored, an FP8 cache widened to q's dtype)."""
    offs_d = tl.arange(0, D_P2)
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=rows_ok[:, None] & dim_ok[None, :],
                other=0.0)
    qk_scale, cap_inv, _ = kv_scales(K_SCALE, V_SCALE, kv_head, stride_ks, stride_vs, qk_scale,
                                     cap_inv, FP8)
    q_pos = offs_g // GROUP + seq_len - lq
    return attend_diagonal(acc, m_i, l_i, q, K + kv_head * stride_kh, V + kv_head * stride_vh,
                           TABLE + seq.to(tl.int64) * stride_tb, stride_tc, stride_kb, stride_kt,
                           stride_vb, stride_vt, lo, seq_len, q_pos, qk_scale, cap_log2,
                           cap_inv, offs_d, dim_ok, SOFTCAP, True, PAGE, DOT, KV_SAME_STRIDES)


@triton.jit
def _few_query_tiles(seen, lq, BLOCK_N: tl.constexpr):
    """Key tiles of a few-query pair (scalars or vectors): of the keys all of its rows see, and
    at least one where it has a query, so that a pair whose keys all lie on the diagonal (``lk <
    lq``), or that has none, is one piece too (the diagonal, then an empty walk)."""
    return tl.where(lq > 0, tl.maximum(tl.cdiv(tl.maximum(seen, 0), BLOCK_N), 1), 0)


@triton.jit
def _first_rows(x, ROWS: tl.constexpr, KEEP: tl.constexpr):
    """The first ``KEEP`` rows of ``x`` ``[ROWS, C]`` (powers of two), by halving."""
    if ROWS > KEEP:
        half = tl.split(tl.permute(tl.reshape(x, [2, ROWS // 2, x.shape[1]]), [1, 2, 0]))[0]
        return _first_rows(half, ROWS // 2, KEEP)
    else:
        return x


@triton.jit
def _owner(t, q, r):
    """The program whose range holds tile ``t`` when program p takes ``q + (p < r)`` tiles."""
    big = r * (q + 1)  # the tiles of the first r programs
    return tl.where(t < big, t // (q + 1), r + (t - big) // tl.maximum(q, 1))
