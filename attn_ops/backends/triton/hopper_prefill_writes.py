"""What the Gluon Hopper prefill (hopper_prefill_kernel.py) writes besides attention: the zeros
of rows that see no key (padding rows past the last sequence, tiles with no key; their lse
``-inf`` when it writes one) and its
non-finite flags (the kernel's docstring: one int32 per 64 or 16 output rows, each written every
call, so the caller hands over uninitialised flags), and both for a packed item with nothing to
compute. Each runs in a 4-warp partition. Imported only by the kernel's module, inside its guard
for a Triton without Gluon.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def zero_rows(O, LSE, row_lo, row_hi, head, num_heads, stride_ot, stride_oh,
              ROWS: gl.constexpr, HEAD_DIM: gl.constexpr, num_warps: gl.constexpr,
              WITH_LSE: gl.constexpr):
    """Zeros for rows ``row_lo .. min(row_lo + ROWS, row_hi) - 1`` of head ``head``, and with
    ``WITH_LSE`` their lse ``-inf`` (LSE float32 ``[Tq, num_heads]``, contiguous)."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    r = row_lo + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    ptrs = (O + gl.expand_dims(r.to(gl.int64) * stride_ot, 1) + head * stride_oh
            + gl.expand_dims(d, 0))
    mask = gl.expand_dims(r < row_hi, 1) & gl.expand_dims(d < HEAD_DIM, 0)
    zeros = gl.zeros([ROWS, HEAD_DIM], O.dtype.element_ty, layout)
    gl.store(ptrs, zeros, mask=mask)
    if WITH_LSE:
        gl.store(LSE + r.to(gl.int64) * num_heads + head,
                 gl.full([ROWS], float("-inf"), gl.float32, r.type.layout), mask=r < row_hi)


@gluon.jit
def store_flags(ptr, value, COUNT: gl.constexpr):
    """``ptr[0 .. COUNT - 1] = value`` (an int32 scalar) from a 4-warp partition."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    i = gl.arange(0, 128, layout=layout)
    STEP: gl.constexpr = 1 if COUNT > 1 else 0  # one flag: the scalar's address
    gl.store(ptr + i * STEP, value + i * 0, mask=i < COUNT)


@gluon.jit
def zero_unvisited_flags(FLAGS, CU_Q, stride_cq, num_seqs, num_heads, min_q, g, head,
                         PER_ITEM: gl.constexpr):
    """Zeros for the ``PER_ITEM`` flags (tile ``g``, ``head``) of the sequences no item
    visits."""
    layout: gl.constexpr = gl.BlockedLayout([1, PER_ITEM], [32, 1], [4, 1], [1, 0])
    warps = gl.expand_dims(gl.arange(0, PER_ITEM, layout=gl.SliceLayout(0, layout)), 0)
    for c0 in range(0, num_seqs, 128):
        b = c0 + gl.arange(0, 128, layout=gl.SliceLayout(1, layout))
        ok = b < num_seqs
        lo = gl.load(CU_Q + b * stride_cq, mask=ok, other=0)
        hi = gl.load(CU_Q + (b + 1) * stride_cq, mask=ok, other=0)
        idx = ((g * (num_seqs + 1) + b) * num_heads + head) * PER_ITEM
        skip = gl.expand_dims(ok & (hi - lo <= min_q), 1) & (warps < PER_ITEM)
        gl.store(FLAGS + gl.expand_dims(idx, 1) + warps, warps * 0, mask=skip)


@gluon.jit
def flag_slots(warp, quarter, PACK: gl.constexpr):
    """Offsets of the flags of a one-consumer item's warps ``warp`` (0-3: rows 16 w .. 16 w +
    15) from the item's first flag (its first head's, in the layout of four 16-row flags per
    64-row tile and head): ``warp`` itself; packed (``PACK`` heads of TOK = 64 / PACK tokens,
    head-major rows, the tokens from quarter ``quarter`` of their 64-row tile on), head
    ``16 w // TOK``'s flag of quarter ``quarter + (16 w % TOK) // 16``."""
    if PACK > 1:
        TOK: gl.constexpr = 64 // PACK
        warp = (16 * warp // TOK) * 4 + quarter + (16 * warp % TOK) // 16
    return warp


@gluon.jit
def pass_packed_item(O, LSE, flags, CU_Q, stride_cq, num_seqs, num_heads, seq, head, q_start,
                     lq, m0, total_q, tiles, stride_ot, stride_oh, HEAD_DIM: gl.constexpr,
                     PACK: gl.constexpr, WITH_LSE: gl.constexpr):
    """A packed item with nothing to compute (hopper_prefill_items.packed_item): its four flags
    (from ``flags``, its first) 0, and zeros for its rows of heads ``head .. head + PACK - 1``:
    in the padding column (``seq == num_seqs``) the rows past ``cu_seqlens_q[-1]``, strided over
    the chunks; else its tokens below ``lq`` (a chunk that sees no key)."""
    TOK: gl.constexpr = 64 // PACK
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    i = gl.arange(0, 128, layout=layout)
    gl.store(flags + flag_slots(i, (m0 % 64) // 16, PACK), i * 0, mask=i < 4)
    if seq == num_seqs:
        first = gl.load(CU_Q + num_seqs * stride_cq)
        for p in gl.static_range(PACK):
            for r0 in range(first + m0, total_q, tiles * 64):
                zero_rows(O, LSE, r0, total_q, head + p, num_heads, stride_ot, stride_oh, TOK,
                          HEAD_DIM, 4, WITH_LSE)
    elif m0 < lq:
        for p in gl.static_range(PACK):
            zero_rows(O, LSE, q_start + m0, q_start + lq, head + p, num_heads, stride_ot,
                      stride_oh, TOK, HEAD_DIM, 4, WITH_LSE)
