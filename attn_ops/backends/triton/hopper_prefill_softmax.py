"""The Gluon Hopper prefill's row arithmetic (hopper_prefill_kernel.py): one online-softmax
step over a tile of scores, and the rows' finish (the output's scale, the sinks, the lse), as
softmax.py's are for the Triton kernels. Imported only by the kernel's module, inside its guard
for a Triton without Gluon.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def online_softmax(s, m_i, l_i, n0, full_hi, lk, q_pos, offs_n, qk_scale,
                   BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """Online-softmax step (exp2 domain, ``m`` kept scaled) over raw scores ``s`` of keys
    ``n0 ..``; masks only when the tile has a key some row must not see."""
    if n0 + BLOCK_N > full_hi:
        ok = (n0 + offs_n) < lk
        if CAUSAL:
            ok = ok & ((n0 + offs_n) <= q_pos)
        s = gl.where(ok, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@gluon.jit
def sink_logits(SINK_LOGITS, stride_sk, head, rows_layout: gl.constexpr, BLOCK_M: gl.constexpr,
                PACK: gl.constexpr):
    """The item's sink logits in the exp2 domain (``sink * log2 e``), loaded when the item
    starts so the load's latency passes under its key walk: one scalar (every row is head
    ``head``'s), or per row in the packed form (row r is head ``head + r // TOK``)."""
    if PACK > 1:
        TOK: gl.constexpr = BLOCK_M // PACK
        ro = gl.arange(0, BLOCK_M, layout=rows_layout)
        sink = gl.load(SINK_LOGITS + (head + ro // TOK) * stride_sk)
    else:
        sink = gl.load(SINK_LOGITS + head * stride_sk)
    return sink * 1.4426950408889634  # log2(e)


@gluon.jit
def finish_rows(l_o, m_o, sink2, LSE, q_start, lq, head, num_heads, m0w,
                BLOCK_M: gl.constexpr, PACK: gl.constexpr, SINKS: gl.constexpr,
                WITH_LSE: gl.constexpr):
    """The output rows' scale (``acc * inv`` is the normalised output) from their running sum
    ``l_o`` and maximum ``m_o`` (exp2 domain, scaled), as softmax.finish: with ``SINKS`` the
    head's sink ``2^sink2`` (:func:`sink_logits`) joins the denominator; a row that saw no key
    gets 0 and lse ``-inf`` (its sink dropped, so a merge never counts it twice). With
    ``WITH_LSE`` each row's natural-log lse is stored at ``LSE[token, head]`` (float32
    ``[Tq, H]``). Depends on the softmax's state only, so the kernel runs it while the item's
    last ``P V`` is in flight."""
    seen = l_o > 0.0
    if SINKS:
        m_f = gl.where(seen, gl.maximum(m_o, sink2), 0.0)
        scale_f = gl.exp2(m_o - m_f)
        den = l_o * scale_f + gl.exp2(sink2 - m_f)
        inv = gl.where(seen, scale_f / gl.where(seen, den, 1.0), 0.0)
    else:
        m_f = m_o
        den = l_o
        inv = gl.where(seen, 1.0 / gl.where(seen, l_o, 1.0), 0.0)
    if WITH_LSE:
        ro = gl.arange(0, BLOCK_M, layout=l_o.type.layout)
        if PACK > 1:
            TOK: gl.constexpr = BLOCK_M // PACK
            h_o = head + ro // TOK
            tok = m0w + ro % TOK
        else:
            h_o = head + ro * 0
            tok = m0w + ro
        none = l_o == 0.0
        lse2 = gl.where(none, float("-inf"), m_f + gl.log2(gl.where(none, 1.0, den)))
        gl.store(LSE + (q_start + tok).to(gl.int64) * num_heads + h_o,
                 lse2 * 0.6931471805599453, mask=tok < lq)  # ln(2)
    return inv
