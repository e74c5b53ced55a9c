"""The online softmax shared by the Triton attention kernels: the key-tile step over a key range
(prefill and unified kernels), the finiteness check of a key range's values (prefill kernel),
the FP8 scales, the row finish that adds the sink and gives the log-sum-exp, and the split-KV
merge inside the last split program (unified and decode kernels). How the decode kernels widen
an FP8 tile read as int16 is fp8_widening.py.

Scores live in the log2 domain (``common.scores_log2``): ``m_i`` is a row's running maximum of
``s * log2(e)``, ``l_i`` its running sum of ``2^(s log2 e - m_i)``, ``acc`` the unnormalised
``P @ V``. FP8 K/V tiles (float8_e4m3fn) are loaded as they are stored (half the bytes of bf16)
and widened to q's dtype in registers; their scales are folded in outside the loop
(:func:`kv_scales`: ``q . (k s_k) = s_k (q . k)`` and ``P (v s_v) = s_v (P v)``), so a tile costs
one conversion and no multiply.

Imported only by the kernel modules (it imports triton).
"""

from __future__ import annotations

import triton
import triton.language as tl

from attn_ops.backends.triton.common import mma, paged_offsets, scores_log2
from attn_ops.backends.triton.split_counters import last_to_count_in

@triton.jit
def load_rows(ptrs, row_ok, dim_ok, MASK_ROWS: tl.constexpr, MASK_DIM: tl.constexpr):
    """Load a [rows, D_P2] tile, masking only what can be out of range (unmasked loads
    vectorise)."""
    if MASK_ROWS:
        if MASK_DIM:
            return tl.load(ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        else:
            return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if MASK_DIM:
            return tl.load(ptrs, mask=dim_ok[None, :], other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def attend(acc, m_i, l_i, q, K, V, table_row, stride_tc, stride_kb, stride_kt, stride_vb,
           stride_vt, lo, hi, key_end, q_pos, window_left, qk_scale, cap_log2, cap_inv, offs_n,
           offs_d, dim_ok, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, MASK_DIM: tl.constexpr,
           CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
           PAGED: tl.constexpr, PAGE: tl.constexpr, DOT: tl.constexpr,
           ISOLATE: tl.constexpr = True, STAGES: tl.constexpr = None,
           KV_SAME_STRIDES: tl.constexpr = False):
    """Online-softmax update of (acc, m_i, l_i) over keys ``lo .. hi-1`` in BLOCK_N steps.

    ``q_pos[r]`` is row r's query position in key coordinates (``i + lk - lq``); keys at or past
    ``key_end`` are never read. With ``MASKED`` False every key of every step must be below
    ``key_end`` and visible to every row (no mask arithmetic, unmasked loads).

    Isolation (masked steps of a causal or windowed call, unless ``ISOLATE`` is False: the
    caller knows every key of the range is visible to every row): a value row that a row of the
    tile must not see can still be non-finite, and ``0 * NaN`` would carry it through ``P @ V``
    into that row. Such value rows are zeroed with a select, and ``p`` becomes NaN exactly where
    a row does see one, so the rows that see it still say so (the reference's rule). Cost: a
    row sum of the V tile and two selects, on masked steps only; the V tile makes a round trip
    through registers (LDS, select, STS, fence) before ``P @ V`` reads it. A caller that can
    check the range first (:func:`value_sums`, :func:`all_finite`) runs it only when one of the
    values is non-finite (the prefill kernel's causal diagonal).

    ``STAGES`` sets the loop's software pipelining depth (None: the launch's ``num_stages``).
    ``KV_SAME_STRIDES``: paged V read at K's offsets (common.paged_offsets).
    """
    for start in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        pos = start + offs_n
        key_ok = pos < key_end
        if PAGED:
            k_off, v_off = paged_offsets(table_row, stride_tc, pos, key_ok, stride_kb, stride_kt,
                                         stride_vb, stride_vt, PAGE, KV_SAME_STRIDES)
        else:
            # int32 within one sequence (its base is already int64): the unmasked step's SASS
            # matches the one before the stride change (sm_90a, 4 x 4096 causal config)
            k_off = pos * stride_kt
            v_off = pos * stride_vt
        k = load_rows(K + k_off[:, None] + offs_d[None, :], key_ok, dim_ok, MASKED, MASK_DIM)
        qk = mma(q, tl.trans(k.to(q.dtype)), None, DOT)
        s = scores_log2(qk, qk_scale, cap_log2, cap_inv, SOFTCAP)
        if MASKED:
            ok = key_ok[None, :]
            if CAUSAL:
                ok = ok & (pos[None, :] <= q_pos[:, None])
            if WINDOW:
                ok = ok & (pos[None, :] >= q_pos[:, None] - window_left)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw no key yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        v = load_rows(V + v_off[:, None] + offs_d[None, :], key_ok, dim_ok, MASKED,
                      MASK_DIM).to(q.dtype)
        if MASKED and ISOLATE and (CAUSAL or WINDOW):
            v_sum = tl.sum(v.to(tl.float32), 1)
            finite = (v_sum - v_sum) == 0.0  # False for a row holding NaN or +-Inf
            v = tl.where(finite[:, None], v, 0.0)
            p = tl.where(finite[None, :] | ~ok, p, float("nan"))
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = mma(p.to(v.dtype), v, acc, DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attend_diagonal(acc, m_i, l_i, q, K, V, table_row, stride_tc, stride_kb, stride_kt,
                    stride_vb, stride_vt, lo, hi, q_pos, qk_scale, cap_log2, cap_inv, offs_d,
                    dim_ok, SOFTCAP: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
                    DOT: tl.constexpr, KV_SAME_STRIDES: tl.constexpr = False):
    """Online-softmax update over causal keys ``lo .. hi-1`` that some rows of the tile see and
    others do not (a few-query tile's own keys: fewer than its queries), in 16-key tiles loaded
    straight into registers (no pipelining ring).

    Isolation as softmax.attend's (a non-finite value row is zeroed and turns ``p`` NaN exactly
    in the rows that see it), but only on these keys and on a 16-key tile: applied to the whole
    one-loop walk it cost the small path 16 KB of shared memory and 28 registers per program
    (the unified kernel's small path, sm_90a: 151 vs 123, one program fewer per SM; H200, B 64 x
    4 queries over 2048 keys: 189 us vs 130 before isolation).

    Its step repeats :func:`attend`'s masked, isolating step on purpose: the same keys through
    ``attend`` itself (16-key steps, one stage; the same ptxas resources) ran B 16 x 4 queries
    over 2048 keys in 49.9 us against 45.7 here (H200, graph replays of bench_unified.py's
    few-query table in two passes on two machines, where B 64 ran 1-3% faster in the second).
    """
    offs_t = tl.arange(0, 16)
    for start in tl.range(lo, hi, 16, num_stages=1):
        pos = start + offs_t
        key_ok = pos < hi
        if PAGED:
            k_off, v_off = paged_offsets(table_row, stride_tc, pos, key_ok, stride_kb, stride_kt,
                                         stride_vb, stride_vt, PAGE, KV_SAME_STRIDES)
        else:
            k_off = pos * stride_kt
            v_off = pos * stride_vt
        tile_ok = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(K + k_off[:, None] + offs_d[None, :], mask=tile_ok, other=0.0)
        s = scores_log2(mma(q, tl.trans(k.to(q.dtype)), None, DOT), qk_scale, cap_log2, cap_inv,
                        SOFTCAP)
        sees = key_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(sees, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw no key yet
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        v = tl.load(V + v_off[:, None] + offs_d[None, :], mask=tile_ok, other=0.0).to(q.dtype)
        v_sum = tl.sum(v.to(tl.float32), 1)
        finite = (v_sum - v_sum) == 0.0  # False for a row holding NaN or +-Inf
        v = tl.where(finite[:, None], v, 0.0)
        p = tl.where(finite[None, :] | ~sees, p, float("nan"))
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def value_sums(V, table_row, stride_tc, stride_vb, stride_vt, lo, hi, offs_n, offs_d, dim_ok,
               TILES: tl.constexpr, BLOCK_N: tl.constexpr, MASK_DIM: tl.constexpr,
               PAGED: tl.constexpr, PAGE: tl.constexpr, DTYPE: tl.constexpr):
    """fp32 ``[BLOCK_N]``: the value rows of keys ``lo .. hi-1`` (at most ``TILES * BLOCK_N``
    keys), read in BLOCK_N-key tiles as :func:`attend` reads them, added tile over tile in
    ``DTYPE`` (q's: two bf16 per add), then each row summed. Non-finite where a value is NaN or
    +-Inf, or where a sum overflows (a false alarm only, see :func:`all_finite`).

    The tiles are unrolled and the rows are summed within a warp (no barrier), so the caller's
    next loads can issue before :func:`all_finite` waits for these (sm_90a, D = 128: the check
    and q loads all in flight together).
    """
    total = tl.zeros([BLOCK_N, offs_d.shape[0]], dtype=DTYPE)
    for t in tl.static_range(TILES):
        pos = lo + t * BLOCK_N + offs_n
        key_ok = pos < hi
        if PAGED:
            _, v_off = paged_offsets(table_row, stride_tc, pos, key_ok, stride_vb, stride_vt,
                                     stride_vb, stride_vt, PAGE)
        else:
            v_off = pos * stride_vt
        v = load_rows(V + v_off[:, None] + offs_d[None, :], key_ok, dim_ok, True, MASK_DIM)
        total += v.to(DTYPE)
    return tl.sum(total.to(tl.float32), 1)


@triton.jit
def all_finite(sums):
    """True (a scalar) when every element of ``sums`` (from :func:`value_sums`) is finite. A
    false result from an overflow on finite values only makes the caller isolate, which is
    exact either way."""
    total = tl.sum(sums, 0)
    return (total - total) == 0.0


@triton.jit
def kv_scales(K_SCALE, V_SCALE, kv_head, stride_ks, stride_vs, qk_scale, cap_inv,
              FP8: tl.constexpr):
    """(qk_scale, cap_inv, v_scale) with an FP8 cache's per-head (or scalar: stride 0) scales
    folded in; the scores take k's scale, the output v's. Without FP8: unchanged and 1."""
    if FP8:
        ks = tl.load(K_SCALE + kv_head * stride_ks)
        vs = tl.load(V_SCALE + kv_head * stride_vs)
        return qk_scale * ks, cap_inv * ks, vs
    else:
        return qk_scale, cap_inv, 1.0


@triton.jit
def finish(m_i, l_i, sink2, v_scale, SINKS: tl.constexpr):
    """(factor, lse2) of rows (vectors or scalars): ``acc * factor`` is the normalised output
    and lse2 the log2 of the softmax denominator (in ``2^(s log2 e)`` units), the sink
    ``2^sink2`` included when ``SINKS``. A row that saw no key (``l_i == 0``) gets factor 0 and
    lse2 = -inf: its sink is dropped, so a merge never counts it twice. A NaN ``l_i`` (a row that
    saw a non-finite value) stays NaN in both."""
    seen = l_i > 0
    if SINKS:
        m_f = tl.where(seen, tl.maximum(m_i, sink2), 0.0)
        alpha = tl.math.exp2(m_i - m_f)
        den = l_i * alpha + tl.math.exp2(sink2 - m_f)
        factor = tl.where(seen, alpha * v_scale / tl.where(seen, den, 1.0), 0.0)
        lse2 = tl.where(l_i == 0, float("-inf"), m_f + tl.math.log2(tl.where(l_i == 0, 1.0, den)))
    else:
        factor = tl.where(seen, v_scale / tl.where(seen, l_i, 1.0), 0.0)
        lse2 = tl.where(l_i == 0, float("-inf"), m_i + tl.math.log2(tl.where(l_i == 0, 1.0, l_i)))
    factor = tl.where(l_i == l_i, factor, float("nan"))
    return factor, lse2


@triton.jit
def merge_if_last(SEMA, sema_idx, O_PART, LSE_PART, part, part_split_stride, num_splits, OUT,
                  out_ptrs, row_ok, offs_d, dim_ok, sink2, LSE, lse_idx, ROWS: tl.constexpr,
                  D_P2: tl.constexpr, HEAD_DIM: tl.constexpr, SINKS: tl.constexpr,
                  WITH_LSE: tl.constexpr):
    """Count this split program in; the last of the ``num_splits`` programs of a tile merges
    every split's partial (``O_PART[part + s * part_split_stride]``, normalised without the sink,
    and its log2-sum-exp in ``LSE_PART``) into ``out_ptrs``, adds the sink here (so it counts
    once however the keys were split), writes the lse when ``WITH_LSE``, and resets the counter
    for the next call.

    This replaces a second (merge) launch: on the H200 that launch cost ~2.9 us of device time
    plus the gap between the two kernels, 13% of a B = 16, ctx 2048 decode (42 us vs 36 us for
    stage 1 alone). Ordering: split_counters.last_to_count_in; the merging program reads the
    partials through L2 (``.cg``), never a stale L1 line.
    """
    if last_to_count_in(SEMA, sema_idx, 1, num_splits):
        m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        den = tl.zeros([ROWS], dtype=tl.float32)
        acc = tl.zeros([ROWS, D_P2], dtype=tl.float32)
        mask = row_ok[:, None] & dim_ok[None, :]
        for s in range(0, num_splits):
            idx = part + s * part_split_stride
            lse = tl.load(LSE_PART + idx, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
            o = tl.load(O_PART + idx[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0,
                        cache_modifier=".cg")
            m_new = tl.maximum(m, lse)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m - m_use)
            w = tl.math.exp2(lse - m_use)  # an empty split (lse = -inf) weighs 0
            acc = acc * alpha[:, None] + w[:, None] * tl.where(w[:, None] > 0, o, 0.0)
            den = den * alpha + w
            m = m_new
        factor, lse2 = finish(tl.where(m == float("-inf"), 0.0, m), den, sink2, 1.0, SINKS)
        tl.store(out_ptrs, (acc * factor[:, None]).to(OUT.dtype.element_ty), mask=mask)
        store_lse(LSE, lse_idx, lse2, row_ok, WITH_LSE)
        tl.store(SEMA + sema_idx, 0)


@triton.jit
def lse_of_output(out, lse2):
    """``lse2`` with NaN in each row of ``out`` (``[rows, D]``) that is not finite: the
    reference's rule where keys are hidden (causal, window), under which a row that sees a
    non-finite key or value row gets NaN in its output and its lse (reference.poison_rows).
    The isolating loops make ``p`` NaN for such a row only on masked steps; one it sees on an
    unmasked step reaches the output through ``P V`` but not the row's sum."""
    chk = tl.sum(out - out, 1)  # NaN where the row holds a NaN or an infinity, else 0
    return tl.where(chk == chk, lse2, float("nan"))


@triton.jit
def store_lse(LSE, idx, lse2, mask, WITH_LSE: tl.constexpr):
    """Store the natural-log lse (``lse2 * ln 2``) at ``LSE + idx`` when ``WITH_LSE``."""
    if WITH_LSE:
        tl.store(LSE + idx, lse2 * 0.6931471805599453, mask=mask)
