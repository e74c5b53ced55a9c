"""FP8 caches widened to fp16 in registers, as the decode kernels' key walk reads them
(decode_keys.py; decode_kernel.FP8_VIA_F16 and FP8_PAIRS say why and what it bought).

A bf16 q is rescaled per row into fp16's range (:func:`to_f16_rows`) so the MMAs run in fp16,
whose e4m3 conversion is one instruction per two values on sm89+. The K and V tiles are read
as int16, two FP8 bytes per element, and each becomes a pair of fp16 tiles:
- V in its even and odd columns (:func:`fp8_pairs`): ``P V``'s operand pairs two keys' values
  of one column in a register, so each two 16-bit elements take a byte permute;
- K in the halves of every four bytes (:func:`fp8_key_halves`, q split alike by
  :func:`key_half_rows`): ``Q K^T``'s operand pairs neighbours along the head dim, which one
  conversion of one 16-bit element gives as they are.
``ASM`` picks the inline conversions (compiled kernels); the plain Triton form (the
interpreter) computes the same values.

Imported only by the kernel modules (it imports triton).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def to_f16_rows(q):
    """``(q16, row_scale)``: fp16 rows with ``q = q16 * row_scale[:, None]``.

    Each row is divided by a power of two (no rounding of q's values) that puts its largest
    magnitude in [2^13, 2^14], so a bf16 q (8 exponent bits) fits fp16's range and keeps all of
    its 8 significant bits (fp16 has 11); only elements below 2^-28 of their row's largest lose
    bits, far below the dot product's own rounding. A non-finite row stays non-finite (NaN or
    inf times 2^-inf gives NaN). Row scales are in 2^shift form, so ``row_scale`` is exact.
    """
    qf = q.to(tl.float32)
    amax = tl.max(tl.abs(qf), 1)
    shift = tl.where(amax > 0, tl.math.ceil(tl.math.log2(tl.maximum(amax, 1e-30))) - 14.0,
                     0.0)
    return (qf * tl.math.exp2(-shift)[:, None]).to(tl.float16), tl.math.exp2(shift)


@triton.jit
def fp8_pairs(x, ASM: tl.constexpr):
    """fp16 ``(even, odd)``: the two e4m3 bytes of each 16-bit element of ``x`` (an FP8 row read
    as int16: columns 2j and 2j+1), widened. ``ASM``: one byte permute and two paired
    conversions per two elements (sm89+), where Triton's own casts take shifts and masks."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; .reg .b16 lo, hi; prmt.b32 t, $2, 0, 0x3120; mov.b32 {lo, hi}, t; "
            "cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
            "=r,=r,r", [x], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    else:
        return _fp8_bytes(x)  # the low byte is the even column


@triton.jit
def fp8_key_halves(x, ASM: tl.constexpr):
    """fp16 ``(a, b)`` ``[rows, J]`` from ``x`` ``[rows, J]`` (FP8 rows read as int16, J even):
    of each four bytes ``4t .. 4t+3`` (elements 2t and 2t+1 of ``x``), ``a`` takes bytes 4t and
    4t+1 (columns 2t and 2t+1), ``b`` bytes 4t+2 and 4t+3. A dot over the row's columns is the
    sum of the two halves' dots when q is split the same way (:func:`key_half_rows`). Why this
    split and not even and odd columns (:func:`fp8_pairs`): where ``x``'s two elements of a
    32-bit register are neighbours along the row (the K tile of ``Q K^T``, whose pairs run
    along the head dim), each half's two fp16 values are one paired conversion of one 16-bit
    element, with no byte permute (sm_90a: 32 of the FP8 decode step's 64 PRMT)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; "
            "cvt.rn.f16x2.e4m3x2 $1, hi; }",
            "=r,=r,r", [x], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    else:
        ROWS: tl.constexpr = x.shape[0]
        J: tl.constexpr = x.shape[1]
        x0, x1 = tl.split(tl.reshape(x, [ROWS, J // 2, 2]))
        lo0, hi0 = _fp8_bytes(x0)
        lo1, hi1 = _fp8_bytes(x1)
        return (tl.reshape(tl.join(lo0, hi0), [ROWS, J]), tl.reshape(tl.join(lo1, hi1), [ROWS, J]))


@triton.jit
def _fp8_bytes(x):
    """fp16 (low byte, high byte) of each int16 element of ``x``, read as e4m3."""
    lo = (x & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    hi = ((x >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    return lo, hi


@triton.jit
def key_half_rows(q, ROWS: tl.constexpr, D: tl.constexpr):
    """q ``[ROWS, D]`` split as :func:`fp8_key_halves` splits a key row: ``(a, b)``
    ``[ROWS, D // 2]``, ``a`` columns ``4t, 4t+1``, ``b`` columns ``4t+2, 4t+3``."""
    q4 = tl.permute(tl.reshape(q, [ROWS, D // 4, 2, 2]), (0, 1, 3, 2))  # (t, pair, half)
    a, b = tl.split(q4)
    return tl.reshape(a, [ROWS, D // 2]), tl.reshape(b, [ROWS, D // 2])


@triton.jit
def _int16_rows(base16, off16, key_ok, offs_j, HEAD_DIM: tl.constexpr):
    """The FP8 rows at int16 offsets ``off16`` from ``base16`` (the cache read as int16), as
    ``[len(off16), len(offs_j)]`` int16; rows past ``key_ok`` and columns past the head read 0."""
    return tl.load(base16 + off16[:, None] + offs_j[None, :],
                   mask=key_ok[:, None] & (offs_j < HEAD_DIM // 2)[None, :], other=0)


@triton.jit
def fp8_key_tile(base16, off16, key_ok, offs_j, HEAD_DIM: tl.constexpr, ASM: tl.constexpr):
    """:func:`fp8_key_halves` of the FP8 rows at int16 offsets ``off16`` from ``base16`` (the
    cache read as int16)."""
    return fp8_key_halves(_int16_rows(base16, off16, key_ok, offs_j, HEAD_DIM), ASM)


@triton.jit
def fp8_pair_tile(base16, off16, key_ok, offs_j, HEAD_DIM: tl.constexpr, ASM: tl.constexpr):
    """A pair of fp16 tiles ``[len(off16), len(offs_j)]``, the even and the odd columns of the
    FP8 rows at int16 offsets ``off16`` from ``base16`` (the cache read as int16). The split
    decode kernel reads FP8 caches so (see its FP8_PAIRS): Triton loads an 8-bit tile the MMA
    takes along its rows (V) from shared memory one byte at a time, a 16-bit one with the
    transposing matrix load."""
    return fp8_pairs(_int16_rows(base16, off16, key_ok, offs_j, HEAD_DIM), ASM)
