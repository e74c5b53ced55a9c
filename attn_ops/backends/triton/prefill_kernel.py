"""Varlen flash-attention forward (FA2-style online softmax, exp2 domain) for attn::prefill.

Grid ``(cdiv(max_seqlen_q, BLOCK_M), B + 1, H)``: program ``(i, b, h)`` computes one BLOCK_M tile
of query rows of sequence b, head h. Tiles are taken last-first (``i = 0`` is the sequence's last
tile, the one that sees the most keys under a causal mask) so the long causal tiles start early
and short ones fill the tail of the schedule. Programs past their sequence's tile count exit at
once. The extra ``b = B`` column zeroes the token rows past ``cu_seqlens_q[-1]`` (rows owned by no
sequence), so the output is fully written with no host sync and no memset.

Each tile walks its key range in three loops: masked tiles below the window, unmasked tiles (no
causal/window/bounds arithmetic: the bulk of the work), masked tiles at the diagonal and the end.
K/V come either from the packed ``[Tk, Hkv, D]`` tensors or, with a block table, from the paged
caches through a per-token block lookup (any page size).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from attn_ops.backends.triton.common import (INTERPRET, dot_mode, extras, kv_same_strides,
                                             next_pow2, result, softcap_constants)
from attn_ops.backends.triton.launch import launch, prepare
from attn_ops.backends.triton.softmax import (all_finite, attend, finish, kv_scales,
                                              lse_of_output, store_lse, value_sums)


@triton.jit
def _attend_masked(acc, m_i, l_i, q, K, V, table_row, stride_tc, stride_kb, stride_kt, stride_vb,
                   stride_vt, lo, hi, lk, q_pos, window_left, qk_scale, cap_log2, cap_inv, offs_n,
                   offs_d, dim_ok, clean, BLOCK_N: tl.constexpr, MASK_DIM: tl.constexpr,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                   PAGED: tl.constexpr, PAGE: tl.constexpr, DOT: tl.constexpr,
                   KV_SAME_STRIDES: tl.constexpr):
    """The diagonal masked loop of :func:`attend`, isolating hidden values only when the caller
    found a non-finite one among the keys it loads (``clean`` False).

    Why (sm_90a SASS of the 4 x 4096 causal bf16 D=128 launch, Triton 3.6): isolating every
    masked step (the V tile through registers: LDS, row sum, select, STS, fence; a select on p)
    took that step from 906 to 1704 instructions and the kernel to 255 registers with a spill,
    and the register pressure cost the unmasked loop 18 more (608 -> 626; strides kept in
    uniform registers and copied back per use): 404-414 TFLOP/s against 437-446 before. With
    the check: 610 and 904, no spill; the check adds ~440 instructions once per tile. The
    isolating loop runs unpipelined (one stage) so that its registers do not shape the rest.
    """
    if clean:
        acc, m_i, l_i = attend(acc, m_i, l_i, q, K, V, table_row, stride_tc, stride_kb,
                               stride_kt, stride_vb, stride_vt, lo, hi, lk, q_pos, window_left,
                               qk_scale, cap_log2, cap_inv, offs_n, offs_d, dim_ok, BLOCK_N,
                               True, MASK_DIM, CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE, DOT, False,
                               KV_SAME_STRIDES=KV_SAME_STRIDES)
    else:
        acc, m_i, l_i = attend(acc, m_i, l_i, q, K, V, table_row, stride_tc, stride_kb,
                               stride_kt, stride_vb, stride_vt, lo, hi, lk, q_pos, window_left,
                               qk_scale, cap_log2, cap_inv, offs_n, offs_d, dim_ok, BLOCK_N,
                               True, MASK_DIM, CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE, DOT, True,
                               1, KV_SAME_STRIDES)
    return acc, m_i, l_i


@triton.jit
def _tile(Q, K, V, O, TABLE, LSE, SINK_LOGITS, K_SCALE, V_SCALE, stride_qt, stride_qh, stride_kb,
          stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_ot, stride_oh, stride_tb,
          stride_tc, stride_sk, stride_ks, stride_vs, seq, head, num_heads, m0, q_start, lq,
          k_start, lk, qk_scale, cap_log2, cap_inv, window_left,
          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_P2: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
          WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
          DOT: tl.constexpr, HAS_SINKS: tl.constexpr, FP8: tl.constexpr,
          WITH_LSE: tl.constexpr, KV_SAME_STRIDES: tl.constexpr):
    """Query rows ``m0 .. m0 + BLOCK_M - 1`` (those below lq) of sequence ``seq``, head
    ``head``: out (and lse) written, every row's keys in three loops."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_P2)
    dim_ok = offs_d < HEAD_DIM
    MASK_DIM: tl.constexpr = HEAD_DIM != D_P2
    rows = m0 + offs_m
    row_ok = rows < lq
    q_rows = (q_start + rows).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    kv_head = head // GROUP
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

    # Bottom-right alignment: query row i sits at key position i + lk - lq.
    diag = lk - lq
    q_pos = rows + diag
    # Visible keys of the tile: [lo, hi). Keys in [f_lo, f_hi) are visible to every row.
    hi = lk
    full_hi = lk
    if CAUSAL:
        hi = tl.minimum(lk, m0 + BLOCK_M + diag)
        full_hi = tl.minimum(lk, m0 + diag + 1)
    lo = 0
    full_lo = 0
    if WINDOW:
        lo = tl.maximum(m0 + diag - window_left, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.maximum(m0 + BLOCK_M - 1 + diag - window_left, 0)
    f_lo = tl.maximum(lo, tl.cdiv(full_lo, BLOCK_N) * BLOCK_N)
    f_hi = tl.maximum(tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N, f_lo)

    # Causal, no window: hidden non-finite values (see softmax.attend) can only sit in the keys
    # of the diagonal loop's steps past the first row's position (< BLOCK_M + BLOCK_N - 1 keys,
    # up to the end of its last step's tile). They are checked first, and the loop isolates
    # only when one is non-finite. On sm_90a the check's loads issue beside q's (q goes to
    # shared memory just before the first dot), so their latencies overlap. Windowed launches
    # keep isolating every masked step: their extra loop copies made ptxas serialize wgmma.
    clean = True
    if CAUSAL and not WINDOW:
        sums = value_sums(v_base, table_row, stride_tc, stride_vb, stride_vt,
                          tl.maximum(f_hi, m0 + diag + 1),
                          tl.minimum(f_hi + tl.cdiv(hi - f_hi, BLOCK_N) * BLOCK_N, lk), offs_n,
                          offs_d, dim_ok, (BLOCK_M + 2 * BLOCK_N - 3) // BLOCK_N, BLOCK_N,
                          MASK_DIM, PAGED, PAGE, Q.dtype.element_ty)
        clean = all_finite(sums)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_P2], dtype=tl.float32)
    acc, m_i, l_i = attend(acc, m_i, l_i, q, k_base, v_base, table_row, stride_tc, stride_kb,
                           stride_kt, stride_vb, stride_vt, lo, tl.minimum(f_lo, hi), lk, q_pos,
                           window_left, qk_scale, cap_log2, cap_inv, offs_n, offs_d, dim_ok,
                           BLOCK_N, True, MASK_DIM, CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE, DOT,
                           KV_SAME_STRIDES=KV_SAME_STRIDES)
    acc, m_i, l_i = attend(acc, m_i, l_i, q, k_base, v_base, table_row, stride_tc, stride_kb,
                           stride_kt, stride_vb, stride_vt, f_lo, f_hi, lk, q_pos, window_left,
                           qk_scale, cap_log2, cap_inv, offs_n, offs_d, dim_ok, BLOCK_N, False,
                           MASK_DIM, CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE, DOT,
                           KV_SAME_STRIDES=KV_SAME_STRIDES)
    if CAUSAL and not WINDOW:
        acc, m_i, l_i = _attend_masked(acc, m_i, l_i, q, k_base, v_base, table_row, stride_tc,
                                       stride_kb, stride_kt, stride_vb, stride_vt, f_hi, hi, lk,
                                       q_pos, window_left, qk_scale, cap_log2, cap_inv, offs_n,
                                       offs_d, dim_ok, clean, BLOCK_N, MASK_DIM, CAUSAL, WINDOW,
                                       SOFTCAP, PAGED, PAGE, DOT, KV_SAME_STRIDES)
    else:
        acc, m_i, l_i = attend(acc, m_i, l_i, q, k_base, v_base, table_row, stride_tc,
                               stride_kb, stride_kt, stride_vb, stride_vt, f_hi, hi, lk, q_pos,
                               window_left, qk_scale, cap_log2, cap_inv, offs_n, offs_d, dim_ok,
                               BLOCK_N, True, MASK_DIM, CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE,
                               DOT, KV_SAME_STRIDES=KV_SAME_STRIDES)

    sink2 = 0.0
    if HAS_SINKS:
        sink2 = tl.load(SINK_LOGITS + head * stride_sk) * 1.4426950408889634  # log2(e)
    factor, lse2 = finish(m_i, l_i, sink2, v_scale, HAS_SINKS)  # no key seen: zeros, -inf
    out = acc * factor[:, None]
    if WITH_LSE and (CAUSAL or WINDOW):
        lse2 = lse_of_output(out, lse2)
    store_lse(LSE, q_rows * num_heads + head, lse2, row_ok, WITH_LSE)
    o_ptrs = O + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _fixup(Q, K, V, O, CU_Q, CU_K, TABLE, LSE, SINK_LOGITS, K_SCALE, V_SCALE, FLAGS,
           stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
           stride_ot, stride_oh, stride_cq, stride_ck, stride_tb, stride_tc, stride_sk,
           stride_ks, stride_vs, num_seqs, qk_scale, cap_log2, cap_inv, window_left, tiles,
           GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_P2: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
           WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
           DOT: tl.constexpr, HAS_SINKS: tl.constexpr, FP8: tl.constexpr,
           WITH_LSE: tl.constexpr, PER_HALF: tl.constexpr, KV_SAME_STRIDES: tl.constexpr):
    """The ``FIXUP`` program of :func:`_prefill_kernel` (see there). Half ``half`` of tile
    ``g`` is rows ``(cdiv(lq, 2 * BLOCK_M) - 1 - g) * 2 * BLOCK_M + half * BLOCK_M ..`` of its
    sequence, and its flags the ``PER_HALF`` from ``half * PER_HALF`` on."""
    SCAN: tl.constexpr = 64  # (g, sequence) pairs per vector load: one load for most calls
    head = tl.program_id(2)
    num_heads = tl.num_programs(2)
    pairs = tiles * (num_seqs + 1)
    share = tl.cdiv(pairs, tl.num_programs(0))
    lo = tl.program_id(0) * share
    hi = tl.minimum(lo + share, pairs)
    offs_j = tl.arange(0, SCAN)
    offs_f = tl.arange(0, 2 * PER_HALF)
    dirty = 0
    for c in range(lo, hi, SCAN):
        j = (c + offs_j).to(tl.int64)
        f = tl.load(FLAGS + (j * num_heads + head)[:, None] * (2 * PER_HALF) + offs_f[None, :],
                    mask=(j < hi)[:, None], other=0)
        dirty = tl.maximum(dirty, tl.max(tl.max(f, 1), 0))
    if dirty != 0:  # a flagged half: rewritten here (rare: a non-finite value reached it)
        for j in range(lo, hi):
            g = j // (num_seqs + 1)
            seq = j % (num_seqs + 1)
            for half in range(2):
                flag = tl.max(tl.load(FLAGS + ((j * num_heads + head) * 2 + half) * PER_HALF
                                      + tl.arange(0, PER_HALF)), 0)  # few: int32
                q_start = tl.load(CU_Q + seq * stride_cq, mask=seq < num_seqs, other=0)
                lq = tl.load(CU_Q + (seq + 1) * stride_cq, mask=seq < num_seqs, other=0) - q_start
                m0 = (tl.cdiv(lq, 2 * BLOCK_M) - 1 - g) * 2 * BLOCK_M + half * BLOCK_M
                if (flag != 0) & (seq < num_seqs) & (m0 >= 0) & (m0 < lq):
                    k_start = tl.load(CU_K + seq * stride_ck)
                    lk = tl.load(CU_K + (seq + 1) * stride_ck) - k_start
                    _tile(Q, K, V, O, TABLE, LSE, SINK_LOGITS, K_SCALE, V_SCALE, stride_qt,
                          stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                          stride_vh, stride_ot, stride_oh, stride_tb, stride_tc, stride_sk,
                          stride_ks, stride_vs, seq, head, num_heads, m0, q_start, lq, k_start,
                          lk, qk_scale, cap_log2, cap_inv, window_left, GROUP, HEAD_DIM, D_P2,
                          BLOCK_M, BLOCK_N, CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE, DOT,
                          HAS_SINKS, FP8, WITH_LSE, KV_SAME_STRIDES)


@triton.jit(do_not_specialize=["total_q", "window_left", "fixup_tiles"])
def _prefill_kernel(Q, K, V, O, CU_Q, CU_K, TABLE, LSE, SINK_LOGITS, K_SCALE, V_SCALE, FLAGS,
                    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                    stride_vh, stride_ot, stride_oh, stride_cq, stride_ck, stride_tb, stride_tc,
                    stride_sk, stride_ks, stride_vs, total_q, num_seqs,
                    qk_scale, cap_log2, cap_inv, window_left, fixup_tiles,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_P2: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PAGED: tl.constexpr,
                    PAGE: tl.constexpr, DOT: tl.constexpr, HAS_SINKS: tl.constexpr,
                    FP8: tl.constexpr, WITH_LSE: tl.constexpr, FIXUP: tl.constexpr = False,
                    FLAGS_PER_HALF: tl.constexpr = 1, KV_SAME_STRIDES: tl.constexpr = False):
    """Program ``(i, b, h)``: tile i (counted from the sequence's last) of sequence b, head h.

    ``FIXUP`` (no window: the Hopper route): FLAGS holds the Hopper kernel's int32 flags (else
    unused), one per (its tile g < fixup_tiles, sequence, head, ``BLOCK_M / FLAGS_PER_HALF``
    rows of the tile's ``2 * BLOCK_M``), in that order; program ``(p, 0, h)`` rewrites the
    halves of head h that hold a flag among its share of the (g, sequence) pairs and returns at
    once when none is (one vector load)."""
    if FIXUP:
        _fixup(Q, K, V, O, CU_Q, CU_K, TABLE, LSE, SINK_LOGITS, K_SCALE, V_SCALE, FLAGS,
               stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
               stride_vh, stride_ot, stride_oh, stride_cq, stride_ck, stride_tb, stride_tc,
               stride_sk, stride_ks, stride_vs, num_seqs, qk_scale, cap_log2, cap_inv,
               window_left, fixup_tiles, GROUP, HEAD_DIM, D_P2, BLOCK_M, BLOCK_N, CAUSAL,
               WINDOW, SOFTCAP, PAGED, PAGE, DOT, HAS_SINKS, FP8, WITH_LSE, FLAGS_PER_HALF,
               KV_SAME_STRIDES)
        return
    pid = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)

    if seq == num_seqs:  # zero the rows past cu_seqlens_q[-1], strided over the pid axis
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_P2)
        dim_ok = offs_d < HEAD_DIM
        zeros = tl.zeros([BLOCK_M, D_P2], dtype=O.dtype.element_ty)
        first = tl.load(CU_Q + num_seqs * stride_cq)
        for r0 in range(first + pid * BLOCK_M, total_q, tl.num_programs(0) * BLOCK_M):
            r = r0 + offs_m
            ptrs = O + r.to(tl.int64)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
            tl.store(ptrs, zeros, mask=(r < total_q)[:, None] & dim_ok[None, :])
            store_lse(LSE, r.to(tl.int64) * tl.num_programs(2) + head,
                      tl.full([BLOCK_M], float("-inf"), tl.float32), r < total_q, WITH_LSE)
        return

    q_start = tl.load(CU_Q + seq * stride_cq)
    lq = tl.load(CU_Q + (seq + 1) * stride_cq) - q_start
    tile = tl.cdiv(lq, BLOCK_M) - 1 - pid
    if tile < 0:
        return
    k_start = tl.load(CU_K + seq * stride_ck)
    lk = tl.load(CU_K + (seq + 1) * stride_ck) - k_start
    _tile(Q, K, V, O, TABLE, LSE, SINK_LOGITS, K_SCALE, V_SCALE, stride_qt, stride_qh, stride_kb,
          stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_ot, stride_oh, stride_tb,
          stride_tc, stride_sk, stride_ks, stride_vs, seq, head, tl.num_programs(2),
          tile * BLOCK_M, q_start, lq, k_start, lk, qk_scale, cap_log2, cap_inv, window_left,
          GROUP, HEAD_DIM, D_P2, BLOCK_M, BLOCK_N, CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE, DOT,
          HAS_SINKS, FP8, WITH_LSE, KV_SAME_STRIDES)


class Config(NamedTuple):
    """Launch parameters of the prefill kernel."""
    block_m: int
    block_n: int
    warps: int
    stages: int


# fp16/bf16 on CUDA by padded head dim, from the sweeps in BENCHMARKS.md ("Notes"), H100, bf16,
# H=32, Hkv=8, 4 x 4096 causal: D=128 128x128 and 128x64 tiles (8 warps, 3 stages) 440-453
# TFLOP/s over four runs, within 2% of each other, 64x64/4 warps 402-426; D=64 128x64/8 warps
# 365-389 vs 4 warps 357-359; D=256 128x64/8 warps/2 stages 465-474 vs 64x64/4 warps 332-336.
# Tensor descriptors (TMA) and warp specialisation measured no better (436-438 at D=128) and one
# TMA variant crashed ptxas, so they are not used.
_CUDA_CONFIGS = {16: Config(128, 64, 4, 3), 32: Config(128, 64, 4, 3),
                 64: Config(128, 64, 8, 3), 128: Config(128, 128, 8, 3),
                 256: Config(128, 64, 8, 2)}
# fp32 (ieee dots, 2x the bytes per tile): smaller tiles keep it within shared memory.
_CUDA_CONFIGS_FP32 = {16: Config(64, 32, 4, 2), 32: Config(64, 32, 4, 2),
                      64: Config(64, 32, 4, 2), 128: Config(64, 32, 4, 2),
                      256: Config(32, 32, 4, 1)}


def launch_config(head_dim: int, dtype: torch.dtype, causal: bool) -> Config:
    """A static table, never autotuned at run time (autotuning inside a CUDA graph capture
    would launch extra kernels into the graph)."""
    if INTERPRET:
        return Config(16, 16, 4, 1)  # tiny tiles: several per sequence exercise all three loops
    d_p2 = max(16, next_pow2(head_dim))
    table = _CUDA_CONFIGS_FP32 if dtype == torch.float32 else _CUDA_CONFIGS
    return table[d_p2]


@functools.lru_cache(maxsize=1024)
def _plan(max_seqlen_q: int, num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int,
          dtype: torch.dtype, causal: bool, paged: bool, page: int, window: bool, softcap: bool,
          config: Config | None):
    """Grid, launch options and constexprs from static facts only (cached: ~1 us per call)."""
    cfg = config or launch_config(head_dim, dtype, causal)
    grid = (max(1, triton.cdiv(max_seqlen_q, cfg.block_m)), num_seqs + 1, num_heads)
    consts = dict(GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
                  D_P2=max(16, next_pow2(head_dim)), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                  CAUSAL=causal, WINDOW=window, SOFTCAP=softcap, PAGED=paged, PAGE=page,
                  DOT=dot_mode(dtype), num_warps=cfg.warps, num_stages=cfg.stages)
    return grid, consts


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
            causal: bool = True, block_table: torch.Tensor | None = None, window_left: int = -1,
            softcap: float = 0.0, sinks: torch.Tensor | None = None,
            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
            return_lse: bool = False, config: Config | None = None,
            out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
    """q ``[Tq, H, D]``; k/v ``[Tk, Hkv, D]`` or paged caches ``[blocks, page, Hkv, D]`` with
    ``block_table`` ``[B, W]``; cu_seqlens ``[B+1]`` int32. Returns ``[Tq, H, D]`` in q's dtype,
    and with ``return_lse`` also lse float32 ``[Tq, H]`` (natural log, -inf for a row with no
    key). ``sinks`` float32 ``[H]``; float8_e4m3fn k/v take ``k_scale``/``v_scale`` float32
    ``[]`` or ``[Hkv]`` (read as ``x * scale``).

    ``config`` overrides the static :class:`Config` table (benchmarks); ``out`` (contiguous
    ``[Tq, H, D]``) and ``lse`` (contiguous float32 ``[Tq, H]``) receive the results (tests
    poison them to catch unwritten elements).

    The kernel's ``FIXUP`` mode (the Hopper route's guard) is launched by
    hopper_prefill_launch.fixup.
    """
    total_q, num_heads, head_dim = q.shape
    num_seqs = cu_seqlens_q.shape[0] - 1
    paged = block_table is not None
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ex = extras(q, k, sinks, k_scale, v_scale, return_lse, lse)
    if total_q == 0:
        return result(out, ex)
    if k.numel() == 0 or num_seqs == 0 or (paged and block_table.numel() == 0):
        return result(out, ex, nothing_seen=True)  # no key anywhere (static shapes say so)
    table = block_table if paged else cu_seqlens_k  # dense: cu_seqlens_k stands in (unused)
    grid, consts, scalars = launch_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        scale, causal, block_table, window_left, softcap,
                                        out.stride(), ex, config)
    launch(_prefill_kernel, grid, q, k, v, out, cu_seqlens_q, cu_seqlens_k, table,
           *ex.pointers, q, *scalars, **consts)  # q: FLAGS, unused
    return result(out, ex)


def launch_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, causal, block_table,
                 window_left, softcap, out_strides, ex, config) -> tuple[tuple, dict, tuple]:
    """(grid, constexprs and options, the arguments after the 11 pointers) of one launch."""
    total_q, num_heads, head_dim = q.shape
    num_seqs = cu_seqlens_q.shape[0] - 1
    paged = block_table is not None
    # Index tensors and caches are read through their strides (see store_kernel for why not a
    # contiguous copy): a strided cu_seqlens or block table is never misread.
    if paged:
        page, num_kv_heads = k.shape[1], k.shape[2]
        strides = (*k.stride()[:3], *v.stride()[:3])
        table_strides = block_table.stride()
    else:
        page, num_kv_heads = 1, k.shape[1]
        strides = (0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1))
        table_strides = (0, 0)  # cu_seqlens_k stands in for the table: unused
    grid, consts = _plan(int(max_seqlen_q), num_seqs, num_heads, num_kv_heads, head_dim, q.dtype,
                         bool(causal), paged, page, window_left >= 0, softcap > 0,
                         None if config is None else Config(*config))
    qk_scale, cap_log2, cap_inv = softcap_constants(scale, softcap)
    scalars = (q.stride(0), q.stride(1), *strides, out_strides[0], out_strides[1],
               cu_seqlens_q.stride(0), cu_seqlens_k.stride(0), *table_strides, *ex.strides,
               total_q, num_seqs, qk_scale, cap_log2, cap_inv, window_left, 0)
    same = paged and kv_same_strides(k, v)  # dense K/V: unused
    return grid, {**consts, **ex.flags, "KV_SAME_STRIDES": same}, scalars


def bind_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                 causal=True, block_table=None, window_left=-1, softcap=0.0, sinks=None,
                 k_scale=None, v_scale=None, return_lse=False):
    """:func:`prefill` (default tables, no overrides) for the call signature of these
    arguments: grid, constexprs and every non-pointer argument computed once (see
    decode_kernel.bind_decode); the function returned allocates the outputs and launches."""
    if (q.shape[0] == 0 or k.numel() == 0 or cu_seqlens_q.shape[0] == 1
            or (block_table is not None and block_table.numel() == 0)):
        return prefill  # nothing to launch: the wrapper's host-side result
    ex = extras(q, k, sinks, k_scale, v_scale, return_lse)
    shape, dtype, device = q.shape, q.dtype, q.device
    out_strides = torch.empty(shape, device="meta").stride()  # a fresh contiguous output's
    grid, consts, scalars = launch_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        scale, causal, block_table, window_left, softcap,
                                        out_strides, ex, None)
    paged, has_sinks, fp8, with_lse = (block_table is not None, ex.flags["HAS_SINKS"],
                                       ex.flags["FP8"], ex.flags["WITH_LSE"])
    # Alignment checked per call: the caller's tensors, not out / lse (fresh allocations).
    check = (0, 1, 2, 4, 5, 6) + ((8,) if has_sinks else ()) + ((9, 10) if fp8 else ())
    go = prepare(_prefill_kernel, grid, consts, check, scalars)
    empty, lse_shape, f32 = torch.empty, shape[:2], torch.float32
    empty_like, like_q = torch.empty_like, q.stride() == out_strides  # ~0.9 us less than empty
    from attn_ops.backends.triton.launch import stats
    tensor, depth = torch.Tensor, torch._C._len_torch_dispatch_stack

    def run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal=True,
            block_table=None, window_left=-1, softcap=0.0, sinks=None, k_scale=None,
            v_scale=None, return_lse=False):
        if type(q) is not tensor or depth():  # traced or a subclass: the wrapper decides
            return prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           scale, causal, block_table, window_left, softcap, sinks, k_scale,
                           v_scale, with_lse)
        stats["bound"] += 1
        out = empty_like(q) if like_q else empty(shape, dtype=dtype, device=device)
        lse = empty(lse_shape, dtype=f32, device=device) if with_lse else q
        go((q, k, v, out, cu_seqlens_q, cu_seqlens_k, block_table if paged else cu_seqlens_k,
            lse, sinks if has_sinks else q, k_scale if fp8 else q, v_scale if fp8 else q, q))
        return (out, lse) if with_lse else out
    run.routes_traced = True  # the dispatch memo may call it directly (triton.bind_args)
    return run
