"""store_kvcache in one launch: K and V rows of each token to its cache slot; slot -1 skips.

Each program copies ``BLOCK_T`` tokens as one ``[BLOCK_T, Hkv*D]`` tile per tensor: both loads
are issued before either store, so a program keeps 2 * BLOCK_T * Hkv * D elements in flight.
Padding is data (a -1 slot masks its row), never a host-side branch.

Every tensor is read through its strides: the slot mapping may be a strided view (``slots[::2]``)
and the caches any ``[num_blocks, block_size, Hkv, D]`` view with a contiguous last dim. Why not a
``.contiguous()`` copy of the index tensor in the wrapper: that is one more launch per call (about
2-3 us under a CUDA graph, half the time of a 64-token store), while a stride costs one multiply
per row; Triton specialises a stride of 1, so the dense case compiles to the same code as before.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from attn_ops.backends.triton.common import INTERPRET, device_sm_count, next_pow2

# Elements per tensor per program: 8192 bf16 = 16 KB, i.e. 4 x 16-byte loads per thread at 8
# warps. Fewer, larger programs matter at T = 65536 (65536 one-token programs leave the copy
# engine idle between tiny CTAs).
_TILE_ELEMS = 8192


@triton.jit(do_not_specialize=["num_tokens"])
def _store_kvcache_kernel(KEY, VALUE, K_CACHE, V_CACHE, SLOTS, num_tokens, stride_s,
                          stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_kcb, stride_kcp, stride_kch, stride_vcb, stride_vcp, stride_vch,
                          HEAD_DIM: tl.constexpr, ROW: tl.constexpr, ROW_P2: tl.constexpr,
                          PAGE: tl.constexpr, BLOCK_T: tl.constexpr):
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
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key/value ``[T, Hkv, D]`` (last dim contiguous) -> caches ``[blocks, page, Hkv, D]``.

    ``slot_mapping`` ``[T]`` int32/int64 holds flat slots ``block * page + offset``; -1 skips.
    Caches may be any strided view with a contiguous last dim; every index is read through
    its strides (no copy, no host sync).
    """
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    head_dim = k_cache.shape[3]
    row = k_cache.shape[2] * head_dim
    block_t, warps = launch_config(num_tokens, row, key.device)
    _store_kvcache_kernel[(triton.cdiv(num_tokens, block_t),)](
        key, value, k_cache, v_cache, slot_mapping, num_tokens, slot_mapping.stride(0),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        HEAD_DIM=head_dim, ROW=row, ROW_P2=next_pow2(row), PAGE=k_cache.shape[1],
        BLOCK_T=block_t, num_warps=warps)
