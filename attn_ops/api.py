"""The public Python functions: keyword arguments and a per-call backend over the custom ops.

``attn_ops.prefill(...)`` is ``torch.ops.attn.prefill(...)`` plus ``backend=``; everything a
compiler or exporter sees is the custom op itself (registered in :mod:`attn_ops.ops`).
"""

from __future__ import annotations

import torch

from attn_ops import ops as _ops  # noqa: F401  (registers torch.ops.attn.*)
from attn_ops.registry import call_under as _call  # op(*args) under backend=, as use_backend

_STORE = torch.ops.attn.store_kvcache.default
_PREFILL = torch.ops.attn.prefill.default
_DECODE = torch.ops.attn.decode.default
_PREFILL_LSE = torch.ops.attn.prefill_with_lse.default
_DECODE_LSE = torch.ops.attn.decode_with_lse.default
_MERGE = torch.ops.attn.merge_states.default


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, *,
                  backend: str | None = None) -> None:
    """Write new tokens' keys and values into the paged caches, in place.

    Args:
        key, value: ``[T, Hkv, D]``, the caches' dtype (any floating dtype for an FP8 cache).
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, any strided view with a
            contiguous last dim (a dense ``[B, Hkv, S, D]`` cache ``.transpose(1, 2)``);
            written in place, through the strides.
            float8_e4m3fn caches receive ``saturate(key / k_scale)`` (clamped to +-448, rounded
            to nearest).
        slot_mapping: ``[T]`` int32/int64, flat slot ``block_id * block_size + offset``; ``-1``
            skips the row (padding).
        k_scale, v_scale: float32 ``[]`` or ``[Hkv]`` device tensors; required with FP8 caches,
            None otherwise.
        backend: run on this backend ("reference", "triton", ...); None follows the context.
    """
    _call(_STORE, (key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale), backend)


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
            causal: bool = True, block_table: torch.Tensor | None = None, window_left: int = -1,
            softcap: float = 0.0, sinks: torch.Tensor | None = None,
            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, *,
            backend: str | None = None) -> torch.Tensor:
    """Variable-length attention over a batch of sequences packed token-major.

    Args:
        q: ``[Tq, H, D]`` fp32/fp16/bf16; sequence b owns rows
            ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.
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
        sinks: float32 ``[H]`` or None: per-head logits that join each row's softmax
            denominator and contribute no value, ``p_j = e^(s_j) / (e^(sink_h) + sum_k e^(s_k))``
            (not scaled, not soft-capped).
        k_scale, v_scale: float32 ``[]`` or ``[Hkv]`` device tensors, required when k/v are
            float8_e4m3fn (then q is fp16/bf16): keys and values are read as ``x * scale``.
        backend: run on this backend; None follows the context.

    Returns:
        ``[Tq, H, D]`` in q's dtype; a query row that sees no key is zero.

    Example:
        >>> q = torch.randn(7, 4, 64); k = v = torch.randn(7, 2, 64)
        >>> cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        >>> prefill(q, k, v, cu, cu, 4, 4, 64 ** -0.5).shape
        torch.Size([7, 4, 64])
    """
    return _call(_PREFILL, (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            scale, causal, block_table, window_left, softcap, sinks, k_scale,
                            v_scale), backend)


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens_k: torch.Tensor,
           block_table: torch.Tensor, scale: float, window_left: int = -1, softcap: float = 0.0,
           sinks: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """One new query per sequence against its paged KV cache.

    Args:
        q: ``[B, H, D]`` fp32/fp16/bf16.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``; store the new token's K/V first.
        seqlens_k: ``[B]`` int32, cached tokens per sequence (new one included); 0 = padded row.
        block_table: ``[B, max_blocks_per_seq]`` int32; entries past a sequence's last block are
            ignored.
        scale, window_left, softcap, sinks, k_scale, v_scale: as in :func:`prefill`.
        backend: run on this backend; None follows the context.

    Returns:
        ``[B, H, D]`` in q's dtype; rows with ``seqlens_k == 0`` are zero.
    """
    return _call(_DECODE, (q, k_cache, v_cache, seqlens_k, block_table, scale, window_left,
                           softcap, sinks, k_scale, v_scale), backend)


def prefill_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, scale: float, causal: bool = True,
                     block_table: torch.Tensor | None = None, window_left: int = -1,
                     softcap: float = 0.0, sinks: torch.Tensor | None = None,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                     *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prefill` that also returns each row's log-sum-exp.

    Returns:
        ``(out [Tq, H, D] in q's dtype, lse [Tq, H] float32)``: lse is the natural log of the
        row's softmax denominator over its scaled (soft-capped) scores, ``exp(sink_h)``
        included, so ``out`` is normalised by ``exp(lse)``; ``-inf`` (and a zero ``out`` row)
        where the row sees no key, sinks or not. Combine parts with :func:`merge_states`.
    """
    return _call(_PREFILL_LSE, (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                scale, causal, block_table, window_left, softcap, sinks, k_scale,
                                v_scale), backend)


def decode_with_lse(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    seqlens_k: torch.Tensor, block_table: torch.Tensor, scale: float,
                    window_left: int = -1, softcap: float = 0.0,
                    sinks: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None, *,
                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode` that also returns ``lse [B, H]`` float32 (as :func:`prefill_with_lse`)."""
    return _call(_DECODE_LSE, (q, k_cache, v_cache, seqlens_k, block_table, scale, window_left,
                               softcap, sinks, k_scale, v_scale), backend)


def merge_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                 lse_b: torch.Tensor, *, backend: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the attention over each.

    Args:
        out_a, out_b: ``[N, H, D]`` one floating dtype, each normalised over its own keys.
        lse_a, lse_b: float32 ``[N, H]``, their log-sum-exps (``-inf``: the part saw no key).
        backend: run on this backend; None follows the context.

    Returns:
        ``(out [N, H, D] in out_a's dtype, lse [N, H] float32)`` with
        ``lse = log(e^lse_a + e^lse_b)`` and
        ``out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b``;
        zeros and ``-inf`` where both parts are ``-inf``. A sink joins the merged denominator
        once per part that was computed with it: give sinks to one part only.

    Example:
        >>> o1, l1 = prefill_with_lse(q, k[:m], v[:m], ...)  # keys [0, m)
        >>> o2, l2 = prefill_with_lse(q, k[m:], v[m:], ...)  # keys [m, n)
        >>> out, lse = merge_states(o1, l1, o2, l2)           # == attention over [0, n)
    """
    return _call(_MERGE, (out_a, lse_a, out_b, lse_b), backend)
