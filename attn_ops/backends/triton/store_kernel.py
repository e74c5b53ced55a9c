"""store_kvcache in one launch: K and V rows of each token to its cache slot; slot -1 skips.

Each program copies ``BLOCK_T`` tokens as one ``[BLOCK_T, Hkv*D]`` tile per tensor: both loads
are issued before either store, so a program keeps 2 * BLOCK_T * Hkv * D elements in flight.
Padding is data (a -1 slot masks its row), never a host-side branch.

Every tensor is read through its strides: the slot mapping may be a strided view (``slots[::2]``)
and the caches any ``[num_blocks, block_size, Hkv, D]`` view with a contiguous last dim. Why not a
``.contiguous()`` copy of the index tensor in the wrapper: that is one more launch per call (about
2-3 us under a CUDA graph, half the time of a 64-token store), while a stride costs one multiply
per row; Triton specialises a stride of 1, so the dense case compiles to the same code as before.

FP8 caches (float8_e4m3fn) receive ``saturate(x / scale)``: the kernel computes the e4m3fn byte
itself (:func:`fp8_e4m3fn_bits`: clamp to +-448, round to nearest even, NaN kept) and stores it
through a uint8 view of the cache. Why not ``.to(tl.float8e4nv)``: Triton 3.9's interpreter
rounds ties away from zero, flushes e4m3 subnormals and turns NaN into 384, so the CPU tests
would check a different rounding than the GPU's ``cvt.rn.satfinite``; the integer encoding is
exact in both, for ~15 integer ops per element of a copy-bound kernel.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from attn_ops.backends.triton import common
from attn_ops.backends.triton.common import (INTERPRET, device_has_pdl, device_sm_count,
                                             gdc_wait, next_pow2, pdl_launch)
from attn_ops.backends.triton.launch import launch, prepare

# Elements per tensor per program: 8192 bf16 = 16 KB, i.e. 4 x 16-byte loads per thread at 8
# warps. Fewer, larger programs matter at T = 65536 (65536 one-token programs leave the copy
# engine idle between tiny CTAs).
_TILE_ELEMS = 8192


@triton.jit
def fp8_e4m3fn_bits(x):
    """float32 ``x`` -> the float8_e4m3fn byte of ``saturate(x)`` (int32 in [0, 255]).

    Clamp to +-448 (e4m3fn has no infinity), round to nearest even on the e4m3 grid (spacing
    ``2^(e-3)`` for normals, ``2^-9`` below ``2^-6``), then pack sign | exponent+7 | 3 mantissa
    bits; NaN -> 0x7F with its sign (as torch's cast). Every float step is exact (power-of-two
    products), and the rounding is fp32's own: ``(q + 1.5 * 2^23) - 1.5 * 2^23`` rounds
    ``q < 2^22`` to an integer, ties to even.
    """
    x = tl.where(x > 448.0, 448.0, tl.where(x < -448.0, -448.0, x))  # NaN fails both: kept
    sign = (x.to(tl.int32, bitcast=True) >> 24) & 0x80
    a = tl.abs(x)
    e = tl.maximum((a.to(tl.int32, bitcast=True) >> 23) - 127, -6)  # below 2^-6: subnormal
    spacing = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2^(e-3)
    inv_spacing = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3-e)
    m = ((a * inv_spacing + 12582912.0) - 12582912.0) * spacing  # rounded magnitude, <= 448
    m_bits = m.to(tl.int32, bitcast=True)
    em = (m_bits >> 23) - 127
    normal = em >= -6
    mant = tl.where(normal, (m_bits >> 20) & 7, (m * 512.0).to(tl.int32))
    code = sign | (tl.where(normal, em + 7, 0) << 3) | mant
    return tl.where(x != x, sign | 0x7F, code)


@triton.jit(do_not_specialize=["num_tokens"])
def _store_kvcache_kernel(KEY, VALUE, K_CACHE, V_CACHE, SLOTS, num_tokens, stride_s,
                          stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_kcb, stride_kcp, stride_kch, stride_vcb, stride_vcp, stride_vch,
                          K_SCALE, V_SCALE, stride_ksh, stride_vsh,
                          HEAD_DIM: tl.constexpr, ROW: tl.constexpr, ROW_P2: tl.constexpr,
                          PAGE: tl.constexpr, BLOCK_T: tl.constexpr, FP8: tl.constexpr,
                          PDL: tl.constexpr = False):
    if PDL:  # a programmatic dependent launch: nothing is read before the kernel before it ends
        gdc_wait()
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = tok < num_tokens
    tok64 = tok.to(tl.int64)
    slot = tl.load(SLOTS + tok64 * stride_s, mask=in_range, other=-1).to(tl.int64)
    write = slot >= 0
    col = tl.arange(0, ROW_P2)  # flat (kv head, dim) index of a cache row of ROW = Hkv * D
    head = col // HEAD_DIM
    dim = col % HEAD_DIM
    mask = write[:, None] & (col < ROW)[None, :]
    k = tl.load(KEY + tok64[:, None] * stride_kt + (head * stride_kh + dim)[None, :], mask=mask)
    v = tl.load(VALUE + tok64[:, None] * stride_vt + (head * stride_vh + dim)[None, :], mask=mask)
    block = slot // PAGE
    offset = slot % PAGE
    k_dst = (block * stride_kcb + offset * stride_kcp)[:, None] + (head * stride_kch + dim)[None, :]
    v_dst = (block * stride_vcb + offset * stride_vcp)[:, None] + (head * stride_vch + dim)[None, :]
    if FP8:  # the caches are uint8 views; a scale is per kv head (stride 0 for one scale)
        k_scale = tl.load(K_SCALE + head * stride_ksh, mask=col < ROW, other=1.0)
        v_scale = tl.load(V_SCALE + head * stride_vsh, mask=col < ROW, other=1.0)
        k = fp8_e4m3fn_bits(tl.div_rn(k.to(tl.float32), k_scale[None, :])).to(tl.uint8)
        v = fp8_e4m3fn_bits(tl.div_rn(v.to(tl.float32), v_scale[None, :])).to(tl.uint8)
    tl.store(K_CACHE + k_dst, k, mask=mask)
    tl.store(V_CACHE + v_dst, v, mask=mask)


@functools.lru_cache(maxsize=1024)
def launch_config(num_tokens: int, row: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_T, num_warps) for ``num_tokens`` rows of ``row`` elements: static shapes only."""
    row_p2 = next_pow2(row)
    if INTERPRET:
        return max(1, min(16, _TILE_ELEMS // row_p2)), 4
    # Enough programs to give every SM ~4 (T = 64 -> one token each, 64 programs), else tiles
    # of _TILE_ELEMS (T = 65536, Hkv*D = 1024 -> 8 tokens, 8192 programs).
    per_sm = max(1, num_tokens // (4 * device_sm_count(device)))
    block_t = min(1 << (per_sm.bit_length() - 1), max(1, _TILE_ELEMS // row_p2))
    warps = 8 if block_t * row_p2 >= 4096 else 4
    return block_t, warps


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                  pdl: bool | None = None) -> None:
    """key/value ``[T, Hkv, D]`` (last dim contiguous) -> caches ``[blocks, page, Hkv, D]``.

    ``slot_mapping`` ``[T]`` int32/int64 holds flat slots ``block * page + offset``; -1 skips.
    Caches may be any strided view with a contiguous last dim; every index is read through
    its strides (no copy, no host sync). float8_e4m3fn caches take float32 ``k_scale``/``v_scale``
    ``[]`` or ``[Hkv]`` (device tensors, read by the kernel) and receive ``saturate(x / scale)``.
    ``pdl`` overrides :data:`.common.LAUNCH_PDL`.
    """
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    grid, consts, scalars = _launch_args(key, value, k_cache, v_cache, slot_mapping, k_scale, pdl)
    if k_scale is not None:
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        scale_strides = (_head_stride(k_scale), _head_stride(v_scale))
    else:
        k_scale = v_scale = slot_mapping  # unread placeholders (FP8 is a constexpr)
        scale_strides = (0, 0)
    launch(_store_kvcache_kernel, grid, key, value, k_cache, v_cache, slot_mapping, *scalars,
           k_scale, v_scale, *scale_strides, **consts)


def _launch_args(key, value, k_cache, v_cache, slot_mapping, k_scale, pdl=None):
    """(grid, constexprs and options, the arguments between the 5 leading pointers and the
    scales) of one store launch (``pdl``: None for :data:`.common.LAUNCH_PDL`)."""
    num_tokens = key.shape[0]
    head_dim = k_cache.shape[3]
    row = k_cache.shape[2] * head_dim
    block_t, warps = launch_config(num_tokens, row, key.device)
    fp8 = k_scale is not None
    # A uint8 view of an FP8 cache (what the kernel stores through) has the cache's strides.
    scalars = (num_tokens, slot_mapping.stride(0), key.stride(0), key.stride(1), value.stride(0),
               value.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3])
    return ((triton.cdiv(num_tokens, block_t),), dict(
        HEAD_DIM=head_dim, ROW=row, ROW_P2=next_pow2(row), PAGE=k_cache.shape[1],
        BLOCK_T=block_t, FP8=fp8, num_warps=warps,
        **pdl_launch((common.LAUNCH_PDL if pdl is None else pdl) and device_has_pdl(key.device))),
        scalars)


def bind_store_kvcache(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """:func:`store_kvcache` for the call signature of these arguments: grid, constexprs and
    every non-pointer argument computed once; the function returned only launches."""
    if key.shape[0] == 0:
        return store_kvcache  # nothing to launch
    grid, consts, scalars = _launch_args(key, value, k_cache, v_cache, slot_mapping, k_scale)
    # Alignment checked per call: the five leading tensors (the scales too with FP8).
    go = prepare(_store_kvcache_kernel, grid, consts, None if k_scale is not None else
                 (0, 1, 2, 3, 4))
    if k_scale is not None:
        strides = (_head_stride(k_scale), _head_stride(v_scale))
        u8 = torch.uint8

        def store_fp8(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
            go((key, value, k_cache.view(u8), v_cache.view(u8), slot_mapping, *scalars,
                k_scale, v_scale, *strides))
        return store_fp8

    def store(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
        go((key, value, k_cache, v_cache, slot_mapping, *scalars, slot_mapping, slot_mapping,
            0, 0))
    return store


def _head_stride(scale: torch.Tensor) -> int:
    """Element stride between kv heads' scales: 0 for one scale ``[]``, else that of ``[Hkv]``."""
    return scale.stride(0) if scale.dim() else 0
