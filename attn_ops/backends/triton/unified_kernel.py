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

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from attn_ops.backends.triton import decode_kernel
from attn_ops.backends.triton.common import (INTERPRET, device_is_sm90, device_sm_count,
                                             dot_mode, extras, next_pow2, result)
from attn_ops.backends.triton.merge_kernel import merge_row
from attn_ops.backends.triton.softmax import (attend, attend_diagonal, finish, kv_scales,
                                              merge_if_last, store_lse)


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
          WITH_LSE: tl.constexpr):
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
                               False)
        acc, m_i, l_i = attend_diagonal(acc, m_i, l_i, q, k_base, v_base, table_row, stride_tc,
                                        stride_kb, stride_kt, stride_vb, stride_vt, every, s_hi,
                                        q_pos, qk_scale, cap_log2, cap_inv, offs_d, dim_ok,
                                        SOFTCAP, PAGED, PAGE, DOT)
    elif ONE_LOOP:  # few rows: masked steps only (a third of the code; the mask is cheap here)
        acc, m_i, l_i = attend(acc, m_i, l_i, q, k_base, v_base, table_row, stride_tc, stride_kb,
                               stride_kt, stride_vb, stride_vt, s_lo, s_hi, s_hi, q_pos,
                               window_left, qk_scale, cap_log2, cap_inv, offs_n, offs_d, dim_ok,
                               BLOCK_N, True, MASK_DIM, CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE, DOT)
    else:
        acc, m_i, l_i = attend(acc, m_i, l_i, q, k_base, v_base, table_row, stride_tc, stride_kb,
                               stride_kt, stride_vb, stride_vt, s_lo, u_lo, s_hi, q_pos,
                               window_left, qk_scale, cap_log2, cap_inv, offs_n, offs_d, dim_ok,
                               BLOCK_N, True, MASK_DIM, CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE, DOT)
        acc, m_i, l_i = attend(acc, m_i, l_i, q, k_base, v_base, table_row, stride_tc, stride_kb,
                               stride_kt, stride_vb, stride_vt, u_lo, u_hi, s_hi, q_pos,
                               window_left, qk_scale, cap_log2, cap_inv, offs_n, offs_d, dim_ok,
                               BLOCK_N, False, MASK_DIM, CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE,
                               DOT)
        acc, m_i, l_i = attend(acc, m_i, l_i, q, k_base, v_base, table_row, stride_tc, stride_kb,
                               stride_kt, stride_vb, stride_vt, u_hi, s_hi, s_hi, q_pos,
                               window_left, qk_scale, cap_log2, cap_inv, offs_n, offs_d, dim_ok,
                               BLOCK_N, True, MASK_DIM, CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE, DOT)

    num_heads = tl.num_programs(1) * GROUP
    lse_idx = q_rows * num_heads + head
    sink2 = 0.0
    if HAS_SINKS:
        sink2 = tl.load(SINK_LOGITS + head * stride_sk, mask=row_ok, other=0.0)
        sink2 = sink2 * 1.4426950408889634  # log2(e)
    o_ptrs = O + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    if DIRECT:  # a row that saw no key: zeros, lse -inf
        factor, lse2 = finish(m_i, l_i, sink2, v_scale, HAS_SINKS)
        tl.store(o_ptrs, (acc * factor[:, None]).to(O.dtype.element_ty), mask=io_mask)
        store_lse(LSE, lse_idx, lse2, row_ok, WITH_LSE)
    else:  # partials [S, part_rows, D] with row = token * H + head; the sink joins at the merge
        factor, lse2 = finish(m_i, l_i, sink2, v_scale, False)
        part = (split * part_rows + lse_idx).to(tl.int64)
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc * factor[:, None],
                 mask=io_mask)
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
                    FP8: tl.constexpr, WITH_LSE: tl.constexpr):
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
                  SOFTCAP, PAGED, PAGE, DIRECT, ONE_LOOP, FUSED, DOT, HAS_SINKS, FP8, WITH_LSE)
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
                  FP8, WITH_LSE)


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


class Config(NamedTuple):
    """Launch parameters: rows of a small-path tile (0: no small path), rows of a large-path tile
    (0: no large path), keys per step, warps, pipeline stages; ``one_loop``: the small path walks
    its keys in one masked loop (else masked / unmasked / masked loops, as the large path);
    ``fused``: the last split program merges (else a second launch, :func:`_merge_kernel`)."""
    small_m: int
    block_m: int
    block_n: int
    warps: int
    stages: int
    one_loop: bool = True
    fused: bool = True  # see decode_kernel.FUSED_MERGE (counters: common.semaphores)


# Split-KV rule of decode_kernel: enough (tile, kv head, split) programs for _TARGET_WAVES times
# the SM count, no split shorter than _MIN_SPLIT_KEYS keys of the static key bound, at most
# _MAX_SPLITS (the merge holds them in registers).
_TARGET_WAVES = 3
_MIN_SPLIT_KEYS = 256
_MAX_SPLITS = 64
# The last split program merges up to this many splits (decode_kernel._FUSED_MAX_SPLITS).
_FUSED_MAX_SPLITS = 8
# Packed rows up to which a sequence is one small-path tile: 64 = 16 queries at G = 4.
_SMALL_ROWS_MAX = 64
# 32-row small tiles over a paged cache (_plan): WIDE unsplit from this many programs per SM,
_WIDE_32_ROWS_MIN = 0.7
# and unsplit 64-row (wgmma) tiles from this many.
_WGMMA_32_ROWS_MIN = 1.55


def launch_config(max_rows: int, head_dim: int, dtype: torch.dtype) -> Config:
    """Static table from the packed-row bound ``max_seqlen_q * G`` (no autotuning: graphs)."""
    if INTERPRET:
        return Config(16, 0 if max_rows <= 16 else 16, 16, 4, 1)
    wide = dtype == torch.float32 or head_dim > 128
    if 16 < max_rows <= 32 and not wide:
        # 32 packed rows (8 queries at G = 4): 128-key steps. H200, bf16, D 128, B 16/64 over
        # 2048/8192 keys: 1.17-1.24x the one-token decode's time vs 1.45-1.57x with 64-key
        # steps (32-key steps 2.0x; BENCHMARKS.md, "few queries").
        return Config(32, 0, 128, 4, 3)
    if max_rows <= _SMALL_ROWS_MAX:  # decode, speculative verification: memory-bound
        return Config(max(16, next_pow2(max_rows)), 0, 32 if wide else 64, 4, 2 if wide else 3)
    if wide:
        return Config(16, 64, 32, 4, 2)
    # 64-row large tiles, 4 warps (H200, bf16, D = 128): the mixed batch of BENCHMARKS.md in
    # 573 us vs 733 with 128 x 64 / 8 warps; short prompts within -2% .. +5% of 128 x 64.
    return Config(16, 64, 64, 4, 3)


def num_splits(programs: int, capacity: int, sms: int, block_n: int) -> int:
    """Split count from static shapes only (see decode_kernel.num_splits)."""
    if programs <= 0 or capacity <= 0:
        return 1
    want = triton.cdiv(_TARGET_WAVES * sms, programs)
    by_length = max(1, capacity // max(_MIN_SPLIT_KEYS, block_n))
    return max(1, min(want, by_length, _MAX_SPLITS))


@functools.lru_cache(maxsize=1024)
def _plan(total_q: int, num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int,
          max_seqlen_q: int, capacity: int, dtype: torch.dtype, device: torch.device,
          decode: bool, causal: bool, paged: bool, page: int, window: bool, softcap: bool,
          config: Config | None, splits: int | None):
    """Grid, split count and constexprs from static facts only (cached: ~1 us per call)."""
    group = num_heads // num_kv_heads
    cfg = config or launch_config(max_seqlen_q * group, head_dim, dtype)
    n_small = num_seqs if cfg.small_m else 0
    n_large = (total_q * group) // cfg.block_m + num_seqs if cfg.block_m else 0
    # Small tiles alone, paged, about one (tile, kv head) program per SM: the decode kernel's
    # WIDE pipeline (128-key steps, 5 stages, its split count). H200 graph replays, B 16 x
    # 2048 keys, 1 / 2 / 4 / 8 queries: 39.9 / 41.5 / 41.7 / 46.8 us vs 42.9 / 44.7 / 45.2 / 53.4
    # (the one-token decode 38.8); x 4096 and x 8192 -3 to -9%; at B 64 it loses (not taken).
    free = (config is None and splits is None and paged and not cfg.block_m and not INTERPRET
            and head_dim <= 128 and dtype in (torch.float16, torch.bfloat16))
    programs, sms = n_small * num_kv_heads, device_sm_count(device) if free else 0
    deep = free and decode_kernel.deep_splits(programs, sms, capacity)
    wide = decode_kernel.WIDE_CONFIG
    if deep and deep[1] == wide:
        splits, cfg = deep[0], cfg._replace(block_n=wide.block_n, stages=wide.stages)
    elif free and cfg.small_m == 32 and _WIDE_32_ROWS_MIN * sms <= programs <= sms:
        # 32-row tiles split dearly (a 32-row merge), so fewer programs take WIDE unsplit.
        # H200, B 12 x 4096, 8 queries (0.73 per SM): 79.5 us vs 101.6 at the rule's 3 splits
        # and 83.4 at 2 (the one-token decode: 56.6).
        splits, cfg = 1, cfg._replace(block_n=wide.block_n, stages=wide.stages)
    elif (free and cfg.small_m == 32 and programs >= _WGMMA_32_ROWS_MIN * sms
          and device_is_sm90(device)):
        # Many 32-row programs: pad them to 64 rows, where Triton issues Hopper's wgmma, with
        # 64-key steps, 5 stages, one split. H200, B 64, 8 queries, over the one-token decode:
        # 1.104x at 2048 keys, 1.055x at 8192 (32 rows: 1.200 / 1.161x).
        splits, cfg = 1, cfg._replace(small_m=64, block_n=64, stages=5)
    if splits is None:
        real_tiles = n_small if not cfg.block_m else (total_q * group) // cfg.block_m + num_seqs
        # A 32-row small tile does twice a 16-row tile's work per key, so it counts twice
        # (H200, B 16 x 8 queries over 2048 keys: 2 splits 53.0 us, 4 splits 57.8).
        weight = 2 if cfg.small_m == 32 and not cfg.block_m else 1
        splits = num_splits(real_tiles * num_kv_heads * weight, capacity,
                            device_sm_count(device), cfg.block_n)
    if config is None and causal and splits == 1 and 2 < cfg.stages < 5 and cfg.small_m < 32:
        # H200, B = 64 sequences of 1-4 queries, ctx 2048, one split: 3 stages 176 us, 2 stages
        # 132 us (the one-token decode: 130); with splits (B = 16) 3 stages measured at parity.
        # 32-row tiles (8 queries) keep 3: B 64 x 2048 154.4 vs 157.8 us, x 8192 564.4 vs 576.2.
        cfg = cfg._replace(stages=2)
    grid = (n_small + n_large + 1, num_kv_heads, splits)
    consts = dict(GROUP=group, HEAD_DIM=head_dim, D_P2=max(16, next_pow2(head_dim)),
                  SMALL_M=max(cfg.small_m, 16), BLOCK_M=max(cfg.block_m, 16),
                  BLOCK_N=cfg.block_n, SMALL_PATH=cfg.small_m > 0, LARGE_PATH=cfg.block_m > 0,
                  SEARCH_STEPS=max(1, num_seqs.bit_length()), DECODE=decode, CAUSAL=causal,
                  WINDOW=window, SOFTCAP=softcap, PAGED=paged, PAGE=page, DIRECT=splits == 1,
                  ONE_LOOP=cfg.one_loop, FUSED=cfg.fused and 1 < splits <= _FUSED_MAX_SPLITS,
                  DOT=dot_mode(dtype),
                  num_warps=cfg.warps, num_stages=cfg.stages)
    merge = dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, D_P2=consts["D_P2"],
                 S_P2=next_pow2(splits), DECODE=decode, num_warps=4)
    return splits, grid, consts, merge


def _launch(q, k, v, out, cu_q, cu_k, seqlens, table, num_seqs, max_seqlen_q, capacity, scale,
            decode, causal, paged, window_left, softcap, config, splits, ex):
    """Plan, partials and launches: :func:`.unified_launch.run` (the host side, kept apart)."""
    from attn_ops.backends.triton import unified_launch
    return unified_launch.run(q, k, v, out, cu_q, cu_k, seqlens, table, num_seqs, max_seqlen_q,
                              capacity, scale, decode, causal, paged, window_left, softcap,
                              config, splits, ex)


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
            causal: bool = True, block_table: torch.Tensor | None = None, window_left: int = -1,
            softcap: float = 0.0, sinks: torch.Tensor | None = None,
            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
            return_lse: bool = False, config: Config | None = None, splits: int | None = None,
            out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
    """attn::prefill's semantics (see prefill_kernel.prefill for shapes, sinks, FP8 scales and
    the lse); ``config``/``splits`` override the static tables (benchmarks); ``out`` receives
    the result, ``lse`` the lse (tests poison them)."""
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
                   softcap, config, splits, ex)


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
