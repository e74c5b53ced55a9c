"""Merges of attention states by their log-sum-exps: merge_states (two parts over disjoint key
sets -> their union, one launch) and the split-KV decode's stage 2: S partials of one row, in a
launch of their own (:func:`merge_splits_kernel`) or by the last split program of a (sequence, kv
head) inside stage 1 (:func:`merge_last_split`).

merge_states:

Each program merges ``BLOCK_R`` (row, head) pairs: it reads both log-sum-exps, both output rows
(``D`` elements each) and writes one output row and one lse, so the kernel moves
``3 * N * H * D`` elements plus the lse and should run at copy bandwidth. Weights are
``exp(lse_x - max)``; a part whose lse is ``-inf`` saw no key and is not read (its output row is
skipped by a select, so garbage or NaN there cannot leak); both ``-inf`` give zeros and ``-inf``.
A NaN lse propagates to the row (never hidden).

Every tensor is read through its strides (the last dim contiguous), so a part may be a view
(``out[:, :H // 2]``) with no copy.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from attn_ops.backends.triton.common import INTERPRET, next_pow2
from attn_ops.backends.triton.launch import launch
from attn_ops.backends.triton.softmax import finish, store_lse
from attn_ops.backends.triton.split_counters import last_to_count_in

# Elements of one output tensor per program: 4096 bf16 = 8 KB, 16 (row, head) pairs at D = 128;
# the kernel is a streaming copy, so tiles only need to be big enough to keep loads in flight.
_TILE_ELEMS = 4096


@triton.jit(do_not_specialize=["pairs"])
def _merge_states_kernel(OUT_A, LSE_A, OUT_B, LSE_B, OUT, LSE, pairs, heads,
                         s_oa_n, s_oa_h, s_ob_n, s_ob_h, s_o_n, s_o_h,
                         s_la_n, s_la_h, s_lb_n, s_lb_h, s_l_n, s_l_h,
                         HEAD_DIM: tl.constexpr, D_P2: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = r < pairs
    n = (r // heads).to(tl.int64)
    h = (r % heads).to(tl.int64)
    la = tl.load(LSE_A + n * s_la_n + h * s_la_h, mask=in_range, other=float("-inf"))
    lb = tl.load(LSE_B + n * s_lb_n + h * s_lb_h, mask=in_range, other=float("-inf"))
    a_empty = la == float("-inf")
    b_empty = lb == float("-inf")
    m = tl.maximum(la, lb)
    m = tl.where(a_empty & b_empty, 0.0, m)
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    denom = wa + wb
    lse = tl.where(a_empty & b_empty, float("-inf"), m + tl.log(denom))
    ca = tl.where(a_empty, 0.0, wa / denom)
    cb = tl.where(b_empty, 0.0, wb / denom)
    col = tl.arange(0, D_P2)
    cols = (col < HEAD_DIM)[None, :]
    read_a = (in_range & ~a_empty)[:, None] & cols
    read_b = (in_range & ~b_empty)[:, None] & cols
    oa = tl.load(OUT_A + (n * s_oa_n + h * s_oa_h)[:, None] + col[None, :], mask=read_a,
                 other=0.0).to(tl.float32)
    ob = tl.load(OUT_B + (n * s_ob_n + h * s_ob_h)[:, None] + col[None, :], mask=read_b,
                 other=0.0).to(tl.float32)
    o = oa * ca[:, None] + ob * cb[:, None]
    tl.store(OUT + (n * s_o_n + h * s_o_h)[:, None] + col[None, :],
             o.to(OUT.dtype.element_ty), mask=in_range[:, None] & cols)
    tl.store(LSE + n * s_l_n + h * s_l_h, lse, mask=in_range)


@functools.lru_cache(maxsize=256)
def launch_config(head_dim: int) -> tuple[int, int]:
    """(BLOCK_R, num_warps) for rows of ``head_dim`` elements (static shapes only)."""
    d_p2 = next_pow2(head_dim)
    block_r = max(1, min(16 if INTERPRET else 128, _TILE_ELEMS // d_p2))
    return block_r, 4


def merge_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                 lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out_a/out_b ``[N, H, D]`` (last dim contiguous), lse_a/lse_b float32 ``[N, H]`` ->
    ``(out [N, H, D] in out_a's dtype, lse [N, H] float32)``; no host sync."""
    n, h, d = out_a.shape
    out = torch.empty((n, h, d), dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty((n, h), dtype=torch.float32, device=out_a.device)
    pairs = n * h
    if pairs == 0:
        return out, lse
    block_r, warps = launch_config(d)
    launch(_merge_states_kernel, (triton.cdiv(pairs, block_r),),
        out_a, lse_a, out_b, lse_b, out, lse, pairs, h,
        out_a.stride(0), out_a.stride(1), out_b.stride(0), out_b.stride(1),
        out.stride(0), out.stride(1), lse_a.stride(0), lse_a.stride(1),
        lse_b.stride(0), lse_b.stride(1), lse.stride(0), lse.stride(1),
        HEAD_DIM=d, D_P2=next_pow2(d), BLOCK_R=block_r, num_warps=warps)
    return out, lse


@triton.jit(do_not_specialize=["num_splits"])
def merge_splits_kernel(O_PART, LSE_PART, OUT, LSE, SINK_LOGITS, num_splits, stride_ob,
                        stride_oh, stride_sk, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                        D_P2: tl.constexpr, S_P2: tl.constexpr, HAS_SINKS: tl.constexpr,
                        WITH_LSE: tl.constexpr):
    """Stage 2 of the split-KV decode (decode_kernel.py), grid ``(B * H,)``: program ``b * H +
    h`` merges the ``num_splits`` normalised partials ``O_PART[b, h, s, :]`` (float32) by their
    log2-sum-exps ``LSE_PART[b, h, s]`` (an empty split: -inf, weight 0), adds the sink once
    (``HAS_SINKS``) and writes the output row (and its lse with ``WITH_LSE``)."""
    row = tl.program_id(0).to(tl.int64)  # seq * H + head
    seq = row // NUM_HEADS
    head = row % NUM_HEADS
    offs_s = tl.arange(0, S_P2)
    offs_d = tl.arange(0, D_P2)
    s_ok = offs_s < num_splits
    dim_ok = offs_d < HEAD_DIM
    idx = row * num_splits + offs_s
    lse = tl.load(LSE_PART + idx, mask=s_ok, other=float("-inf"))
    out, lse2 = merge_row(lse, O_PART, idx, s_ok, offs_d, dim_ok, SINK_LOGITS, head, stride_sk,
                          HEAD_DIM, HAS_SINKS)
    tl.store(OUT + seq * stride_ob + head * stride_oh + offs_d, out.to(OUT.dtype.element_ty),
             mask=dim_ok)
    store_lse(LSE, row, lse2, True, WITH_LSE)


@triton.jit
def merge_row(lse, O_PART, idx, s_ok, offs_d, dim_ok, SINK_LOGITS, head, stride_sk,
              HEAD_DIM: tl.constexpr, HAS_SINKS: tl.constexpr):
    """One row's merge (float32 output ``[D_P2]`` and log2-sum-exp) from its partials:
    ``lse`` ``[S_P2]`` their log2-sum-exps (-inf: an empty split or padding, weight 0), the
    normalised partials ``O_PART[idx, :HEAD_DIM]`` (``idx`` ``[S_P2]``, valid where ``s_ok``),
    the sink of ``head`` added once (``HAS_SINKS``). :func:`merge_splits_kernel` and the
    unified kernel's merge; the partials load after the weights, as each did on its own."""
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)  # empty split: exp2(-inf) = 0
    den = tl.sum(w, 0)
    o = tl.load(O_PART + idx[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_ok[:, None] & dim_ok[None, :], other=0.0)
    sink2 = 0.0
    if HAS_SINKS:
        sink2 = tl.load(SINK_LOGITS + head * stride_sk) * 1.4426950408889634  # log2(e)
    factor, lse2 = finish(m, den, sink2, 1.0, HAS_SINKS)
    return tl.sum(w[:, None] * o, 0) * factor, lse2


@triton.jit
def merge_last_split(SEMA, sema_idx, O_PART, LSE_PART, OUT, LSE, SINK_LOGITS, seq, head0, row0,
                     num_splits, stride_ob, stride_oh, stride_sk, ROWS: tl.constexpr,
                     R_P2: tl.constexpr, HEAD_DIM: tl.constexpr, D_P2: tl.constexpr,
                     S_P2: tl.constexpr, CHUNKS: tl.constexpr, HAS_SINKS: tl.constexpr,
                     WITH_LSE: tl.constexpr):
    """Stage 2 of the split-KV decode inside stage 1: called by every split program of a
    (sequence, kv head) after it stored its partial; the last one to count in at
    ``SEMA[sema_idx]`` merges the ``ROWS`` heads ``head0..`` (rows ``row0..`` of ``[B * H]``)
    as :func:`merge_splits_kernel` does, and sets the counter back to 0.

    The partials load ``S_P2`` splits at a time (a ``[rows, S_P2, D]`` tile: one trip to L2,
    where a walk over the splits pays one per split), ``CHUNKS`` trips unrolled (a loop of
    the merge's own in the kernel changed how ptxas scheduled the key loop: 698 -> 785
    instructions per step at the FP8 deep row) into a running merge: one trip for up to
    decode_kernel.MERGE_CHUNK splits, and no more registers for more splits (sm_90a, 32 splits
    in one tile: 154-168 registers at the 64-key rows against 120-128). Ordering:
    split_counters.last_to_count_in; the partials are read through L2 (``.cg``), never a stale
    L1 line.
    """
    if last_to_count_in(SEMA, sema_idx, 1, num_splits):
        offs_r = tl.arange(0, R_P2)
        offs_s = tl.arange(0, S_P2)
        offs_d = tl.arange(0, D_P2)
        r_ok = offs_r < ROWS
        d_ok = offs_d < HEAD_DIM
        m = tl.full([R_P2], float("-inf"), dtype=tl.float32)
        den = tl.zeros([R_P2], dtype=tl.float32)
        acc = tl.zeros([R_P2, D_P2], dtype=tl.float32)
        for c in tl.static_range(CHUNKS):
            s0 = c * S_P2
            rs_ok = r_ok[:, None] & (s0 + offs_s < num_splits)[None, :]
            idx = (row0 + offs_r)[:, None] * num_splits + (s0 + offs_s)[None, :]  # [R, S]
            acc, den, m = _merge_chunk(acc, den, m, O_PART, LSE_PART, idx, rs_ok, offs_d, d_ok,
                                       HEAD_DIM)
        heads = head0 + offs_r
        _write_merged(OUT, LSE, SINK_LOGITS, seq.to(tl.int64) * stride_ob + heads * stride_oh,
                      heads, row0 + offs_r, r_ok, offs_d, d_ok, acc, den,
                      tl.where(m == float("-inf"), 0.0, m), stride_sk, HAS_SINKS, WITH_LSE)
        tl.store(SEMA + sema_idx, 0)


@triton.jit(noinline=True)
def merge_last_split_call(SEMA, sema_idx, O_PART, LSE_PART, OUT, LSE, SINK_LOGITS, seq, head0,
                          row0, num_splits, stride_ob, stride_oh, stride_sk, ROWS: tl.constexpr,
                          R_P2: tl.constexpr, HEAD_DIM: tl.constexpr, D_P2: tl.constexpr,
                          S_P2: tl.constexpr, CHUNKS: tl.constexpr, HAS_SINKS: tl.constexpr,
                          WITH_LSE: tl.constexpr):
    """:func:`merge_last_split` as a function of its own in the PTX (a call, not inlined), for
    builds that write the lse. Inlined, the lse's store after the key loop changes how ptxas
    allocates the loop: sm_90a, bf16 32/8 heads, D 128, the split kernel's fused builds with the
    lse vs without: FP8_DEEP_CONFIG 168 registers, a 16-byte spill in the loop and 835
    instructions per 128-key step (162, none, 794); WIDE_CONFIG 168 registers, 954 instructions
    (184, 917); FP8_CONFIG 15 spill accesses in the loop (2). Called, the loop is the one
    without the lse, instruction for instruction, in every row. Builds without the lse keep the
    inlined merge (at DEFAULT_CONFIG the call costs their loop 19 instructions)."""
    merge_last_split(SEMA, sema_idx, O_PART, LSE_PART, OUT, LSE, SINK_LOGITS, seq, head0, row0,
                     num_splits, stride_ob, stride_oh, stride_sk, ROWS, R_P2, HEAD_DIM, D_P2,
                     S_P2, CHUNKS, HAS_SINKS, WITH_LSE)


@triton.jit
def merge_pieces(SEMA, pair, mine, tiles, O_PART, LSE_PART, OUT, LSE, SINK_LOGITS, token0,
                 head0, rows, num_heads, p_first, first_slot, span, q, r, stride_ob, stride_oh,
                 stride_sk, GROUP: tl.constexpr, ROWS: tl.constexpr, R_P2: tl.constexpr,
                 HEAD_DIM: tl.constexpr, D_P2: tl.constexpr, CHUNK: tl.constexpr,
                 HAS_SINKS: tl.constexpr, WITH_LSE: tl.constexpr):
    """The balanced kernel's merge (decode_balanced_kernel.py), called by each program holding a
    piece of pair ``pair`` (``tiles`` key tiles; its ``rows`` packed rows, row ``i`` being query
    token ``token0 + i // GROUP``, head ``head0 + i % GROUP``: one token's GROUP heads for a
    decode) after it stored its partial: it adds its piece's ``mine`` tiles at ``SEMA[pair]``,
    and the one that completes the pair's tiles merges every piece into the output (the sink
    added once), writes the lse with ``WITH_LSE`` and sets the counter back to 0. Counting
    tiles, not pieces, needs no count of the pieces: with more programs than tiles (``q`` 0)
    some programs in the pair's range hold nothing.

    The pieces are in programs ``p_first .. p_first + span - 1`` (program p holds ``q`` tiles,
    one more when ``p < r``; skipped when it holds none),
    slot 0 of each, except ``p_first``'s, in slot ``first_slot``: partial rows ``(p * 2 + slot)
    * ROWS + i``. They load ``CHUNK`` programs at a time (a ``[rows, CHUNK, D]`` tile, one trip to
    L2 each) into a running merge, since a long sequence's pair can have many pieces. Ordering as
    :func:`merge_last_split`'s (counting tiles: decode_plan.balanced_applies keeps a pair's
    tiles below split_counters.COUNT_LIMIT).
    """
    if last_to_count_in(SEMA, pair, mine, tiles):
        offs_r = tl.arange(0, R_P2)
        offs_c = tl.arange(0, CHUNK)
        offs_d = tl.arange(0, D_P2)
        r_ok = offs_r < rows
        d_ok = offs_d < HEAD_DIM
        m = tl.full([R_P2], float("-inf"), dtype=tl.float32)
        den = tl.zeros([R_P2], dtype=tl.float32)
        acc = tl.zeros([R_P2, D_P2], dtype=tl.float32)
        for c0 in range(0, span, CHUNK):
            j = c0 + offs_c
            prog = (p_first + j).to(tl.int64)
            held = (j < span) & (q + (prog < r).to(tl.int32) > 0)
            slot_rows = (prog * 2 + tl.where(j == 0, first_slot, 0)) * ROWS
            idx = slot_rows[None, :] + offs_r[:, None]  # [R, CHUNK]
            ok = r_ok[:, None] & held[None, :]
            acc, den, m = _merge_chunk(acc, den, m, O_PART, LSE_PART, idx, ok, offs_d, d_ok,
                                       HEAD_DIM)
        tokens = (token0 + offs_r // GROUP).to(tl.int64)
        heads = head0 + offs_r % GROUP
        _write_merged(OUT, LSE, SINK_LOGITS, tokens * stride_ob + heads * stride_oh, heads,
                      tokens * num_heads + heads, r_ok, offs_d, d_ok, acc, den,
                      tl.where(m == float("-inf"), 0.0, m), stride_sk, HAS_SINKS, WITH_LSE)
        tl.store(SEMA + pair, 0)


@triton.jit
def _merge_chunk(acc, den, m, O_PART, LSE_PART, idx, ok, offs_d, d_ok, HEAD_DIM: tl.constexpr):
    """One trip to L2 of the in-kernel merges: the partials at rows ``idx`` ``[R, C]`` (valid
    where ``ok``: a partial not held, or past the count, loads lse -inf and weighs 0) joined to
    the running ``acc`` ``[R, D]``, weight sum ``den`` and maximum ``m`` ``[R]`` (log2 units),
    read through L2 (``.cg``), never a stale L1 line."""
    lse = tl.load(LSE_PART + idx, mask=ok, other=float("-inf"), cache_modifier=".cg")
    o = tl.load(O_PART + idx[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                mask=ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")
    m_new = tl.maximum(m, tl.max(lse, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m - m_use)
    w = tl.math.exp2(lse - m_use[:, None])  # exp2(-inf) = 0
    return acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 1), den * alpha + tl.sum(w, 1), m_new


@triton.jit
def _write_merged(OUT, LSE, SINK_LOGITS, out_rows, heads, lse_rows, r_ok, offs_d, d_ok, acc, den,
                  m, stride_sk, HAS_SINKS: tl.constexpr, WITH_LSE: tl.constexpr):
    """The end of both in-kernel merges: ``acc`` ``[R, D]`` (the partials weighted by
    ``2^(lse - m)``, summed), ``den`` their weights' sum and ``m`` (finite) the reference maximum
    of the rows at element offsets ``out_rows`` of OUT, of query heads ``heads``; the sink joins
    the denominator once here, and the normalised rows (and their lse at ``lse_rows``, with
    ``WITH_LSE``) are written."""
    sink2 = 0.0
    if HAS_SINKS:
        sink2 = tl.load(SINK_LOGITS + heads * stride_sk, mask=r_ok, other=0.0)
        sink2 = sink2 * 1.4426950408889634  # log2(e)
    factor, lse2 = finish(m, den, sink2, 1.0, HAS_SINKS)
    tl.store(OUT + out_rows[:, None] + offs_d[None, :],
             (acc * factor[:, None]).to(OUT.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])
    store_lse(LSE, lse_rows, lse2, r_ok, WITH_LSE)
