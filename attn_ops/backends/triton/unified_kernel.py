"""One paged attention kernel for every query length: GQA-packed rows, split-KV, varlen tiles.

Rows of a tile are packed (query, head) pairs: the ``G = H / Hkv`` query heads that share a KV
head, times the queries of one sequence, in query-major order (row ``p`` is query ``p // G``,
head ``p % G``). A decode row (one query) fills ``G`` rows, 4 speculative queries ``4 G``, so each
K/V tile is read once for all of them instead of once per head and per query.

Grid ``(tiles, Hkv, S)``, sized from static bounds only (CUDA-graph safe, no host sync):

* programs ``0 .. B-1`` (the small path, when enabled): sequence ``p`` as one tile of
  ``SMALL_M`` rows, when its ``lq * G`` rows fit; otherwise the program exits;
* the next ``(Tq * G) // BLOCK_M + B`` programs (the large path, when enabled): tiles of
  ``BLOCK_M`` rows of the sequences that did not fit the small path. Tile ``t`` finds its
  sequence by a binary search over ``start(b) = (cu_q[b] * G) // BLOCK_M + b``, which is strictly
  increasing and leaves room for ``cdiv(lq_b * G, BLOCK_M)`` tiles for every b; so the launch
  holds at most one idle program per sequence, never ``B * cdiv(max_seqlen_q, BLOCK_M)``;
* one last program zeroes the rows past ``cu_q[B]`` (rows no sequence owns).

Split ``s`` of ``S`` takes an equal, BLOCK_N-aligned share of the tile's visible key range and
writes a normalised partial and its log2-sum-exp; the tile's last split program merges them
(``softmax.merge_if_last``, which adds the sinks), or :func:`_merge_kernel` past 8 splits.
``S = 1`` writes directly, sinks included.
Serves prefill (paged or packed dense K/V) and decode (``DECODE``: lengths from ``seqlens_k``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn_ops.backends.triton.common import extras, result
from attn_ops.backends.triton.merge_kernel import merge_row
from attn_ops.backends.triton.softmax import (attend, attend_diagonal, finish, kv_scales,
                                              lse_of_output, merge_if_last, store_lse)
from attn_ops.backends.triton.unified_plan import Config


@triton.jit
def _tile(Q, K, V, O, O_PART, LSE_PART, SEMA, TABLE, LSE, SINK_LOGITS, K_SCALE, V_SCALE, seq,
          kv_head, split, m0, q_start, lq, k_start, lk, stride_qt, stride_qh, stride_kb,
          stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_ot, stride_oh, stride_tb,
          stride_tc, stride_sk, stride_ks, stride_vs, part_rows, num_splits, qk_scale, cap_log2,
          cap_inv, window_left, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_P2: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
          WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
          DIRECT: tl.constexpr, ONE_LOOP: tl.constexpr, FUSED: tl.constexpr,
          DOT: tl.constexpr, HAS_SINKS: tl.constexpr, FP8: tl.constexpr,
          WITH_LSE: tl.constexpr, KV_SAME_STRIDES: tl.constexpr):
    """Packed rows ``m0 .. m0+BLOCK_M-1`` of one sequence against one split of its keys."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_P2)
    dim_ok = offs_d < HEAD_DIM
    MASK_DIM: tl.constexpr = HEAD_DIM != D_P2
    packed = m0 + offs_m
    row_ok = packed < lq * GROUP
    query = packed // GROUP
    head = kv_head * GROUP + packed % GROUP
    q_rows = (q_start + query).to(tl.int64)
    io_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(Q + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=io_mask, other=0.0)
    qk_scale, cap_inv, v_scale = kv_scales(K_SCALE, V_SCALE, kv_head, stride_ks, stride_vs,
                                           qk_scale, cap_inv, FP8)
    if PAGED:
        k_base = K + kv_head * stride_kh
        v_base = V + kv_head * stride_vh
        table_row = TABLE + seq.to(tl.int64) * stride_tb
    else:
        k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
        table_row = TABLE

    # Bottom-right alignment: query i sits at key position i + lk - lq.
    diag = lk - lq
    q_pos = query + diag
    first_q = m0 // GROUP + diag  # the tile's first and last query positions
    last_q = (tl.minimum(m0 + BLOCK_M, lq * GROUP) - 1) // GROUP + diag
    hi = lk  # visible keys of the tile: [lo, hi); [full_lo, full_hi) visible to every row
    full_hi = lk
    if CAUSAL:
        hi = tl.minimum(lk, last_q + 1)
        full_hi = tl.minimum(lk, first_q + 1)
    lo = 0
    full_lo = 0
    if WINDOW:
        lo = tl.maximum(first_q - window_left, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.maximum(last_q - window_left, 0)
    hi = tl.maximum(hi, lo)
    # This split's share, BLOCK_N-aligned: [s_lo, s_hi).
    chunk = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
    s_lo = tl.minimum(lo + split * chunk, hi)
    s_hi = tl.minimum(s_lo + chunk, hi)
    f_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    f_hi = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
    u_lo = tl.minimum(tl.maximum(f_lo, s_lo), s_hi)
    u_hi = tl.maximum(tl.minimum(f_hi, s_hi), u_lo)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_P2], dtype=tl.float32)
    if ONE_LOOP and CAUSAL and not WINDOW:
        # Few rows, causal: keys up to first_q are seen by every row (one loop, no per-row
        # mask, so nothing to isolate); the few keys past it in 16-key tiles (attend_diagonal).
        every = tl.minimum(tl.maximum(first_q + 1, s_lo), s_hi)
        acc, m_i, l_i = attend(acc, m_i, l_i, q, k_base, v_base, table_row, stride_tc, stride_kb,
                               stride_kt, stride_vb, stride_vt, s_lo, every, every, q_pos,
                               window_left, qk_scale, cap_log2, cap_inv, offs_n, offs_d, dim_ok,
                               BLOCK_N, True, MASK_DIM, False, False, SOFTCAP, PAGED, PAGE, DOT,
                               False, KV_SAME_STRIDES=KV_SAME_STRIDES)
        acc, m_i, l_i = attend_diagonal(acc, m_i, l_i, q, k_base, v_base, table_row, stride_tc,
                                        stride_kb, stride_kt, stride_vb, stride_vt, every, s_hi,
                                        q_pos, qk_scale, cap_log2, cap_inv, offs_d, dim_ok,
                                        SOFTCAP, PAGED, PAGE, DOT, KV_SAME_STRIDES=KV_SAME_STRIDES)
    elif ONE_LOOP:  # few rows: masked steps only (a third of the code; the mask is cheap here)
        acc, m_i, l_i = attend(acc, m_i, l_i, q, k_base, v_base, table_row, stride_tc, stride_kb,
                               stride_kt, stride_vb, stride_vt, s_lo, s_hi, s_hi, q_pos,
                               window_left, qk_scale, cap_log2, cap_inv, offs_n, offs_d, dim_ok,
                               BLOCK_N, True, MASK_DIM, CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE, DOT,
                               KV_SAME_STRIDES=KV_SAME_STRIDES)
    else:
        acc, m_i, l_i = attend(acc, m_i, l_i, q, k_base, v_base, table_row, stride_tc, stride_kb,
                               stride_kt, stride_vb, stride_vt, s_lo, u_lo, s_hi, q_pos,
                               window_left, qk_scale, cap_log2, cap_inv, offs_n, offs_d, dim_ok,
                               BLOCK_N, True, MASK_DIM, CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE, DOT,
                               KV_SAME_STRIDES=KV_SAME_STRIDES)
        acc, m_i, l_i = attend(acc, m_i, l_i, q, k_base, v_base, table_row, stride_tc, stride_kb,
                               stride_kt, stride_vb, stride_vt, u_lo, u_hi, s_hi, q_pos,
                               window_left, qk_scale, cap_log2, cap_inv, offs_n, offs_d, dim_ok,
                               BLOCK_N, False, MASK_DIM, CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE,
                               DOT, KV_SAME_STRIDES=KV_SAME_STRIDES)
        acc, m_i, l_i = attend(acc, m_i, l_i, q, k_base, v_base, table_row, stride_tc, stride_kb,
                               stride_kt, stride_vb, stride_vt, u_hi, s_hi, s_hi, q_pos,
                               window_left, qk_scale, cap_log2, cap_inv, offs_n, offs_d, dim_ok,
                               BLOCK_N, True, MASK_DIM, CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE, DOT,
                               KV_SAME_STRIDES=KV_SAME_STRIDES)

    num_heads = tl.num_programs(1) * GROUP
    lse_idx = q_rows * num_heads + head
    sink2 = 0.0
    if HAS_SINKS:
        sink2 = tl.load(SINK_LOGITS + head * stride_sk, mask=row_ok, other=0.0)
        sink2 = sink2 * 1.4426950408889634  # log2(e)
    o_ptrs = O + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    if DIRECT:  # a row that saw no key: zeros, lse -inf
        factor, lse2 = finish(m_i, l_i, sink2, v_scale, HAS_SINKS)
        out = acc * factor[:, None]
        if WITH_LSE and (CAUSAL or WINDOW):  # NaN for a row that sees a non-finite value
            lse2 = lse_of_output(out, lse2)
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=io_mask)
        store_lse(LSE, lse_idx, lse2, row_ok, WITH_LSE)
    else:  # partials [S, part_rows, D] with row = token * H + head; the sink joins at the merge
        factor, lse2 = finish(m_i, l_i, sink2, v_scale, False)
        part = (split * part_rows + lse_idx).to(tl.int64)
        out = acc * factor[:, None]
        if WITH_LSE and (CAUSAL or WINDOW):  # a NaN part lse: the merged row's lse is NaN
            lse2 = lse_of_output(out, lse2)
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=io_mask)
        tl.store(LSE_PART + part, lse2, mask=row_ok)
        if FUSED:  # the last split of this (tile, kv head) merges; no second launch
            merge_if_last(SEMA, tl.program_id(0) * tl.num_programs(1) + kv_head, O_PART,
                          LSE_PART, part - split * part_rows, part_rows, num_splits, O, o_ptrs,
                          row_ok, offs_d, dim_ok, sink2, LSE, lse_idx, BLOCK_M, D_P2, HEAD_DIM,
                          HAS_SINKS, WITH_LSE)


@triton.jit(do_not_specialize=["total_q", "window_left", "num_splits"])
def _unified_kernel(Q, K, V, O, O_PART, LSE_PART, SEMA, CU_Q, CU_K, SEQLENS, TABLE, LSE,
                    SINK_LOGITS, K_SCALE, V_SCALE,
                    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                    stride_vh, stride_ot, stride_oh, stride_cq, stride_ck, stride_sl, stride_tb,
                    stride_tc, stride_sk, stride_ks, stride_vs, total_q, num_seqs, num_splits,
                    qk_scale, cap_log2, cap_inv, window_left,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_P2: tl.constexpr,
                    SMALL_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    SMALL_PATH: tl.constexpr, LARGE_PATH: tl.constexpr,
                    SEARCH_STEPS: tl.constexpr, DECODE: tl.constexpr, CAUSAL: tl.constexpr,
                    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PAGED: tl.constexpr,
                    PAGE: tl.constexpr, DIRECT: tl.constexpr, ONE_LOOP: tl.constexpr,
                    FUSED: tl.constexpr, DOT: tl.constexpr, HAS_SINKS: tl.constexpr,
                    FP8: tl.constexpr, WITH_LSE: tl.constexpr,
                    KV_SAME_STRIDES: tl.constexpr = False):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    n_small = num_seqs if SMALL_PATH else 0
    if pid == tl.num_programs(0) - 1:
        if not DECODE:  # zero the rows past cu_q[B] for this kv head's heads (split 0 only)
            offs_r = tl.arange(0, 16)
            offs_d = tl.arange(0, D_P2)
            zeros = tl.zeros([16, D_P2], dtype=O.dtype.element_ty)
            first = tl.load(CU_Q + num_seqs * stride_cq)
            if split > 0:
                first = total_q
            for r0 in range(first, total_q, 16):
                r = (r0 + offs_r).to(tl.int64)
                for g in tl.static_range(GROUP):
                    ptrs = (O + r[:, None] * stride_ot + (kv_head * GROUP + g) * stride_oh
                            + offs_d[None, :])
                    tl.store(ptrs, zeros,
                             mask=(r < total_q)[:, None] & (offs_d < HEAD_DIM)[None, :])
                    store_lse(LSE, r * (tl.num_programs(1) * GROUP) + kv_head * GROUP + g,
                              tl.full([16], float("-inf"), tl.float32), r < total_q, WITH_LSE)
        return
    if pid < n_small:
        seq = pid
    else:  # large path: binary search for the sequence that owns tile pid - n_small
        t = pid - n_small
        lo_b = 0
        hi_b = num_seqs
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (lo_b + hi_b) // 2
            start_mid = (tl.load(CU_Q + mid * stride_cq) * GROUP) // BLOCK_M + mid
            go_right = start_mid <= t
            lo_b = tl.where(go_right, mid, lo_b)
            hi_b = tl.where(go_right, hi_b, mid)
        seq = lo_b
    if DECODE:
        q_start = seq
        lq = 1
        k_start = 0
        lk = tl.load(SEQLENS + seq.to(tl.int64) * stride_sl)
    else:
        q_start = tl.load(CU_Q + seq * stride_cq)
        lq = tl.load(CU_Q + (seq + 1) * stride_cq) - q_start
        k_start = tl.load(CU_K + seq * stride_ck)
        lk = tl.load(CU_K + (seq + 1) * stride_ck) - k_start
    rows = lq * GROUP
    if pid < n_small:
        if rows <= SMALL_M:
            _tile(Q, K, V, O, O_PART, LSE_PART, SEMA, TABLE, LSE, SINK_LOGITS, K_SCALE, V_SCALE,
                  seq, kv_head, split, 0, q_start, lq, k_start, lk, stride_qt, stride_qh,
                  stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_ot,
                  stride_oh, stride_tb, stride_tc, stride_sk, stride_ks, stride_vs,
                  total_q * tl.num_programs(1) * GROUP, num_splits, qk_scale, cap_log2, cap_inv,
                  window_left, GROUP, HEAD_DIM, D_P2, SMALL_M, BLOCK_N, CAUSAL, WINDOW,
                  SOFTCAP, PAGED, PAGE, DIRECT, ONE_LOOP, FUSED, DOT, HAS_SINKS, FP8, WITH_LSE,
                  KV_SAME_STRIDES)
    elif LARGE_PATH:
        n_tiles = tl.cdiv(rows, BLOCK_M)
        local = pid - n_small - ((q_start * GROUP) // BLOCK_M + seq)
        # the last tile (most keys under a causal mask) first: long tiles start early
        tile = n_tiles - 1 - local
        take = local < n_tiles
        if SMALL_PATH:
            take = take & (rows > SMALL_M)  # else the small path served it
        if take:
            _tile(Q, K, V, O, O_PART, LSE_PART, SEMA, TABLE, LSE, SINK_LOGITS, K_SCALE, V_SCALE,
                  seq, kv_head, split, tile * BLOCK_M, q_start, lq, k_start, lk, stride_qt,
                  stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                  stride_ot, stride_oh, stride_tb, stride_tc, stride_sk, stride_ks, stride_vs,
                  total_q * tl.num_programs(1) * GROUP, num_splits, qk_scale,
                  cap_log2, cap_inv, window_left, GROUP, HEAD_DIM, D_P2, BLOCK_M, BLOCK_N,
                  CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE, DIRECT, False, FUSED, DOT, HAS_SINKS,
                  FP8, WITH_LSE, KV_SAME_STRIDES)


@triton.jit(do_not_specialize=["num_splits", "part_rows"])
def _merge_kernel(O_PART, LSE_PART, O, CU_Q, LSE, SINK_LOGITS, num_splits, part_rows, stride_ot,
                  stride_oh, stride_cq, stride_sk, num_seqs, NUM_HEADS: tl.constexpr,
                  HEAD_DIM: tl.constexpr, D_P2: tl.constexpr, S_P2: tl.constexpr,
                  DECODE: tl.constexpr, HAS_SINKS: tl.constexpr, WITH_LSE: tl.constexpr):
    """One (token, head) row: weigh the S partials by exp2(lse - max), add the sink. Rows past
    cu_q[B] are left to the stage-1 zeroing program."""
    row = tl.program_id(0).to(tl.int64)  # token * H + head
    token = row // NUM_HEADS
    head = row % NUM_HEADS
    if not DECODE:
        if token >= tl.load(CU_Q + num_seqs * stride_cq):
            return
    offs_s = tl.arange(0, S_P2)
    offs_d = tl.arange(0, D_P2)
    s_ok = offs_s < num_splits
    dim_ok = offs_d < HEAD_DIM
    idx = offs_s.to(tl.int64) * part_rows + row
    lse = tl.load(LSE_PART + idx, mask=s_ok, other=float("-inf"))
    out, lse2 = merge_row(lse, O_PART, idx, s_ok, offs_d, dim_ok, SINK_LOGITS, head, stride_sk,
                          HEAD_DIM, HAS_SINKS)
    tl.store(O + token * stride_ot + head * stride_oh + offs_d, out.to(O.dtype.element_ty),
             mask=dim_ok)
    store_lse(LSE, row, lse2, True, WITH_LSE)


def _launch(q, k, v, out, cu_q, cu_k, seqlens, table, num_seqs, max_seqlen_q, capacity, scale,
            decode, causal, paged, window_left, softcap, config, splits, ex, balanced=None):
    """Plan, partials and launches: :func:`.unified_launch.run` (the host side, kept apart)."""
    from attn_ops.backends.triton import unified_launch
    return unified_launch.run(q, k, v, out, cu_q, cu_k, seqlens, table, num_seqs, max_seqlen_q,
                              capacity, scale, decode, causal, paged, window_left, softcap,
                              config, splits, ex, balanced)


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
            causal: bool = True, block_table: torch.Tensor | None = None, window_left: int = -1,
            softcap: float = 0.0, sinks: torch.Tensor | None = None,
            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
            return_lse: bool = False, config: Config | None = None, splits: int | None = None,
            out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
            balanced: bool | None = None):
    """attn::prefill's semantics (see prefill_kernel.prefill for shapes, sinks, FP8 scales and
    the lse); ``config``/``splits`` override the static tables (benchmarks); ``out`` receives
    the result, ``lse`` the lse (tests poison them); ``balanced`` True / False forces the
    balanced kernel for a few-query paged batch where it can run / never
    (unified_plan.balanced_plan; None: its rule)."""
    total_q = q.shape[0]
    num_seqs = cu_seqlens_q.shape[0] - 1
    paged = block_table is not None
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ex = extras(q, k, sinks, k_scale, v_scale, return_lse, lse)
    if total_q == 0:
        return result(out, ex)
    if k.numel() == 0 or num_seqs == 0 or (paged and block_table.numel() == 0):
        return result(out, ex, nothing_seen=True)  # no key anywhere (static shapes say so)
    capacity = int(max_seqlen_k)
    if paged:
        capacity = min(capacity, block_table.shape[1] * k.shape[1])
    return _launch(q, k, v, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_q, block_table,
                   num_seqs, max_seqlen_q, capacity, scale, False, causal, paged, window_left,
                   softcap, config, splits, ex, balanced)


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens_k: torch.Tensor,
           block_table: torch.Tensor, scale: float, window_left: int = -1, softcap: float = 0.0,
           sinks: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None, return_lse: bool = False,
           config: Config | None = None, splits: int | None = None,
           out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
    """attn::decode's semantics (see decode_kernel.decode for shapes) on the unified kernel."""
    batch = q.shape[0]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ex = extras(q, k_cache, sinks, k_scale, v_scale, return_lse, lse)
    if batch == 0:
        return result(out, ex)
    if k_cache.numel() == 0 or block_table.numel() == 0:
        return result(out, ex, nothing_seen=True)
    capacity = block_table.shape[1] * k_cache.shape[1]
    return _launch(q, k_cache, v_cache, out, seqlens_k, seqlens_k, seqlens_k, block_table, batch,
                   1, capacity, scale, True, False, True, window_left, softcap, config, splits,
                   ex)
