"""The key walk shared by the two one-token decode kernels (decode_kernel.py's split kernel and
decode_balanced_kernel.py): the online softmax of one sequence's GQA group, packed as the rows of
one tile, over a range of its paged keys, FP8 caches widened on the way (see decode_kernel's
FP8_VIA_F16 and FP8_PAIRS for why they are read so).

Imported only by the kernel modules (it imports triton).
"""

from __future__ import annotations

import triton
import triton.language as tl

from attn_ops.backends.triton.common import mma, paged_offsets, scores_log2
from attn_ops.backends.triton.fp8_widening import (fp8_key_tile, fp8_pair_tile,
                                                    key_half_rows, to_f16_rows)
from attn_ops.backends.triton.softmax import kv_scales


@triton.jit
def attend_keys(acc, m_i, l_i, Q, K, V, TABLE, K_SCALE, V_SCALE, q_rows, seq, kv_head, g_ok,
                dim_ok, lo, hi, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                stride_tb, stride_tc, stride_ks, stride_vs, qk_scale, cap_log2, cap_inv,
                G_P2: tl.constexpr, HEAD_DIM: tl.constexpr, D_P2: tl.constexpr,
                PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr,
                DOT: tl.constexpr, FP8: tl.constexpr, FP8_VIA_F16: tl.constexpr,
                FP8_PAIRS: tl.constexpr, PAIR_ASM: tl.constexpr,
                KV_SAME_STRIDES: tl.constexpr):
    """``(acc [G_P2, D_P2], m_i, l_i [G_P2], v_scale)``: the online softmax of the query rows at
    element offsets ``q_rows`` ``[G_P2]`` of Q (valid where ``g_ok``: query heads of ``kv_head``,
    of one query or of a few of sequence ``seq``), from the running state ``acc, m_i, l_i``
    (zeros, -inf, zeros for none), after ``seq``'s keys ``lo .. hi-1`` (at least one, visible to
    every row), in BLOCK_N-key steps through its block-table row. ``acc`` is unnormalised and
    stays so; ``v_scale`` (an FP8 cache's, else 1) is still to be applied.
    ``KV_SAME_STRIDES`` (common.kv_same_strides): V's keys at K's offsets, computed once.
    Both decode kernels run it: the split kernel once per program, the balanced kernel
    (decode_balanced_kernel.py) once per piece of a (sequence, kv head) it takes."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_P2)
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=g_ok[:, None] & dim_ok[None, :],
                other=0.0)

    qk_scale, cap_inv, v_scale = kv_scales(K_SCALE, V_SCALE, kv_head, stride_ks, stride_vs,
                                           qk_scale, cap_inv, FP8)
    mma_dtype = q.dtype
    if FP8_VIA_F16:  # see decode_kernel.FP8_VIA_F16
        q, row_scale = to_f16_rows(q)
        qk_scale = qk_scale * row_scale[:, None]
        cap_inv = cap_inv * row_scale[:, None]
        mma_dtype = tl.float16
    table_row = TABLE + seq.to(tl.int64) * stride_tb
    k_base = K + kv_head * stride_kh
    v_base = V + kv_head * stride_vh
    # FP8_PAIRS (see decode_kernel.FP8_PAIRS): K in halves of four bytes and V in even and odd
    # columns, each a pair of fp16 tiles; q split as K is
    offs_j = tl.arange(0, D_P2 // 2)
    k16 = k_base.to(tl.pointer_type(tl.int16), bitcast=True)
    v16 = v_base.to(tl.pointer_type(tl.int16), bitcast=True)
    q_a, q_b = key_half_rows(q, G_P2, D_P2)
    acc_even, acc_odd = tl.split(tl.reshape(acc, [G_P2, D_P2 // 2, 2]))
    if FP8_PAIRS:
        # Offsets counted in the int16 elements the pair tiles read (the strides are even:
        # decode_kernel._pairs_ok), so the loop halves none (sm_90a, Triton 3.6: 706 -> 698
        # instructions per step of the FP8 deep row).
        stride_kb, stride_kt = stride_kb // 2, stride_kt // 2
        stride_vb, stride_vt = stride_vb // 2, stride_vt // 2
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        key_ok = pos < hi
        k_off, v_off = paged_offsets(table_row, stride_tc, pos, key_ok, stride_kb, stride_kt,
                                     stride_vb, stride_vt, PAGE, KV_SAME_STRIDES)
        tile_ok = key_ok[:, None] & dim_ok[None, :]
        if FP8_PAIRS:
            k_a, k_b = fp8_key_tile(k16, k_off, key_ok, offs_j, HEAD_DIM, PAIR_ASM)
            v_even, v_odd = fp8_pair_tile(v16, v_off, key_ok, offs_j, HEAD_DIM, PAIR_ASM)
            qk = mma(q_b, tl.trans(k_b), mma(q_a, tl.trans(k_a), None, DOT), DOT)
        else:
            # FP8: loaded as stored (half of bf16's bytes), widened in registers
            k = tl.load(k_base + k_off[:, None] + offs_d[None, :], mask=tile_ok, other=0.0)
            v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=tile_ok, other=0.0)
            k = k.to(mma_dtype)
            v = v.to(mma_dtype)
            qk = mma(q, tl.trans(k), None, DOT)
        if SOFTCAP:
            s = scores_log2(qk, qk_scale, cap_log2, cap_inv, SOFTCAP)
            s = tl.where(key_ok[None, :], s, float("-inf"))
        else:  # the mask as a bias per key: one FFMA per score, not an FMUL and an FSEL
            # (sm_90a: 8 instructions less per 128-key step, FP8 deep 648 -> 640)
            s = tl.fma(qk, qk_scale, tl.where(key_ok, 0.0, float("-inf"))[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every step has >= 1 valid key
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP8_PAIRS:
            p16 = p.to(tl.float16)
            acc_even = mma(p16, v_even, acc_even * alpha[:, None], DOT)
            acc_odd = mma(p16, v_odd, acc_odd * alpha[:, None], DOT)
        else:
            acc = acc * alpha[:, None]
            acc = mma(p.to(v.dtype), v, acc, DOT)
        m_i = m_new
    if FP8_PAIRS:  # columns back in order: (j, parity) -> 2j + parity
        acc = tl.reshape(tl.join(acc_even, acc_odd), [G_P2, D_P2])

    return acc, m_i, l_i, v_scale
