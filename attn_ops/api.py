"""The public Python functions: keyword arguments and a per-call backend over the custom ops.

``attn_ops.prefill(...)`` is ``torch.ops.attn.prefill(...)`` plus ``backend=``; everything a
compiler or exporter sees is the custom op itself (registered in :mod:`attn_ops.ops`).
"""

from __future__ import annotations

import torch

from attn_ops import ops as _ops  # noqa: F401  (registers torch.ops.attn.*)
from attn_ops import registry

_STORE = torch.ops.attn.store_kvcache.default
_PREFILL = torch.ops.attn.prefill.default
_DECODE = torch.ops.attn.decode.default


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                  backend: str | None = None) -> None:
    """Write new tokens' keys and values into the paged caches, in place.

    Args:
        key, value: ``[T, Hkv, D]``, the caches' dtype.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, contiguous; written in place.
        slot_mapping: ``[T]`` int32/int64, flat slot ``block_id * block_size + offset``; ``-1``
            skips the row (padding).
        backend: run on this backend ("reference", "triton", ...); None follows the context.
    """
    if backend is None:
        return _STORE(key, value, k_cache, v_cache, slot_mapping)
    with registry.use_backend(backend):
        return _STORE(key, value, k_cache, v_cache, slot_mapping)


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
            causal: bool = True, block_table: torch.Tensor | None = None, window_left: int = -1,
            softcap: float = 0.0, *, backend: str | None = None) -> torch.Tensor:
    """Variable-length attention over a batch of sequences packed token-major.

    Args:
        q: ``[Tq, H, D]`` fp32/fp16/bf16; sequence b owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.
        k, v: ``[Tk, Hkv, D]`` (rows by ``cu_seqlens_k``), or, with ``block_table``, the paged
            caches ``[num_blocks, block_size, Hkv, D]`` holding each sequence's first
            ``lk = cu_seqlens_k[b+1] - cu_seqlens_k[b]`` tokens (prefix caching).
        cu_seqlens_q, cu_seqlens_k: ``[B+1]`` int32, cumulative lengths starting at 0.
        max_seqlen_q, max_seqlen_k: host ints, upper bounds of the lengths (size the grid).
        scale: multiplies q·k (usually ``D ** -0.5``).
        causal: bottom-right aligned: query i sees key j iff ``j <= i + lk - lq``.
        block_table: ``[B, max_blocks_per_seq]`` int32 or None.
        window_left: ``w >= 0`` also requires ``j >= i + lk - lq - w``; -1 disables.
        softcap: ``c > 0`` maps scaled scores s to ``c * tanh(s / c)``; 0 disables.
        backend: run on this backend; None follows the context.

    Returns:
        ``[Tq, H, D]`` in q's dtype; a query row that sees no key is zero.

    Example:
        >>> q = torch.randn(7, 4, 64); k = v = torch.randn(7, 2, 64)
        >>> cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        >>> prefill(q, k, v, cu, cu, 4, 4, 64 ** -0.5).shape
        torch.Size([7, 4, 64])
    """
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
            block_table, window_left, softcap)
    if backend is None:
        return _PREFILL(*args)
    with registry.use_backend(backend):
        return _PREFILL(*args)


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens_k: torch.Tensor,
           block_table: torch.Tensor, scale: float, window_left: int = -1, softcap: float = 0.0,
           *, backend: str | None = None) -> torch.Tensor:
    """One new query per sequence against its paged KV cache.

    Args:
        q: ``[B, H, D]`` fp32/fp16/bf16.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``; store the new token's K/V first.
        seqlens_k: ``[B]`` int32, cached tokens per sequence (new one included); 0 = padded row.
        block_table: ``[B, max_blocks_per_seq]`` int32; entries past a sequence's last block are
            ignored.
        scale, window_left, softcap: as in :func:`prefill`.
        backend: run on this backend; None follows the context.

    Returns:
        ``[B, H, D]`` in q's dtype; rows with ``seqlens_k == 0`` are zero.
    """
    args = (q, k_cache, v_cache, seqlens_k, block_table, scale, window_left, softcap)
    if backend is None:
        return _DECODE(*args)
    with registry.use_backend(backend):
        return _DECODE(*args)
