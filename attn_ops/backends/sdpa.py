"""sdpa backend: PyTorch's fused ``F.scaled_dot_product_attention`` on padded tiles, any device.

The fast pure-torch backend, and "auto"'s choice on CPU. Variable-length and paged batches are
gathered into padded ``[B, H, max_len, D]`` tiles exactly as the reference does (same helpers),
and the contract's mask (padding, bottom-right causal, window) goes to SDPA as one boolean
``[B, 1, Mq, Mk]`` mask, so PyTorch's fused kernels do the softmax(QK^T)V with fp32 accumulation
and never materialise fp32 scores the way the reference oracle does. On a 2-layer CPU model at
S=1024 the reference was 9.6x slower than Inductor's own SDPA (benchmarks/bench_substitution.py);
this backend removes that gap. No softcap (SDPA has none): ``supports`` says so.

Rows that see no key come out of SDPA as NaN (softmax of an empty row); they are zeroed with
a select, as the contract requires, with no host sync. SDPA adds the mask to the scores, so a
masked NaN/Inf key would still reach its row (``NaN + -inf = NaN``) and a masked value through
``0 * NaN``: the shared tiles (:class:`~attn_ops.backends.reference.Tiles`) pad each sequence
with its own last token and zero non-finite keys hidden by causality or a window, and rows that
see a non-finite key or value come out NaN, as on the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attn_ops.backends.reference import (Tiles, _scatter_tokens, decode_tiles, prefill_tiles,
                                         sees_bad, store_kvcache)

name = "sdpa"

__all__ = ["name", "supports", "store_kvcache", "prefill", "decode"]


def supports(config) -> str | None:
    """None when this backend can run the call ``config`` (an ``OpConfig``) describes, else why."""
    if config.op == "store_kvcache":
        return None  # the reference's vectorised index_copy_ (no SDPA involved)
    if config.op not in ("prefill", "decode"):
        return f"{config.op} is not an attention call (the reference and triton backends run it)"
    if config.with_lse:
        return "F.scaled_dot_product_attention does not return the log-sum-exp"
    if config.has_sinks:
        return "attention sinks are not expressible through F.scaled_dot_product_attention"
    if config.fp8_cache:
        return ("F.scaled_dot_product_attention takes no float8_e4m3fn keys/values with "
                "fp16/bf16 queries (no dequantising scales)")
    if config.softcap > 0:
        return "softcap is not expressible through F.scaled_dot_product_attention"
    return None


def _attend(tiles: Tiles, scale: float) -> torch.Tensor:
    """Tiles (q ``[B, Mq, H, D]``, k/v ``[B, Mk, Hkv, D]``) -> ``[B, Mq, H, D]`` in q's dtype."""
    qp, kp, vp, allowed = tiles.q, tiles.k, tiles.v, tiles.allowed
    o = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),
                                       attn_mask=allowed[:, None], scale=scale,
                                       enable_gqa=qp.shape[2] != kp.shape[2])
    # In place on SDPA's fresh [B, H, Mq, D] output (a new tensor costs a page-faulting
    # allocation on the CPU); then a [B, Mq, H, D] view for the caller.
    o.masked_fill_(~allowed.any(dim=-1)[:, None, :, None], 0.0)
    if tiles.bad is not None:
        seen = sees_bad(allowed, tiles.bad, o.shape[1])  # [B, Mq, H]
        o.masked_fill_(seen.transpose(1, 2)[..., None], float("nan"))
    return o.transpose(1, 2)


def prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal=True,
            block_table=None, window_left=-1, softcap=0.0):
    """As :func:`attn_ops.prefill`: q ``[Tq, H, D]`` -> ``[Tq, H, D]``."""
    tiles = prefill_tiles(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                          block_table, window_left)
    if tiles is None:
        return torch.zeros_like(q)
    return _scatter_tokens(_attend(tiles, scale), cu_seqlens_q, q.shape[0])


def _attend_decode(tiles: Tiles, scale: float) -> torch.Tensor:
    """Decode tiles (q ``[B, 1, H, D]``) -> ``[B, H, D]``, the G = H / Hkv query heads of a kv
    head folded into G query rows of it: SDPA runs one ``[G, Mk]`` problem per kv head instead
    of G ``[1, Mk]`` ones through ``enable_gqa``. At H=32, Hkv=8, D=128 and 256 keys on one CPU
    thread: bf16 1.75 -> 0.15 ms, fp32 0.22 -> 0.12 ms. One query row per sequence, so the
    ``[B, 1, 1, Mk]`` mask serves every folded row."""
    qp, kp, vp, allowed = tiles.q, tiles.k, tiles.v, tiles.allowed  # allowed [B, 1, Mk]
    b, _, h, d = qp.shape
    hkv = kp.shape[2]
    o = F.scaled_dot_product_attention(qp.reshape(b, hkv, h // hkv, d), kp.transpose(1, 2),
                                       vp.transpose(1, 2), attn_mask=allowed[:, None],
                                       scale=scale)  # [B, Hkv, G, D]
    o = o.reshape(b, h, d)
    o = o.masked_fill(~allowed.any(dim=-1)[:, :, None], 0.0)  # [B, 1, 1]: no key, zeros
    if tiles.bad is not None:
        o.masked_fill_(sees_bad(allowed, tiles.bad, h)[:, 0, :, None], float("nan"))
    return o


def decode(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left=-1, softcap=0.0):
    """As :func:`attn_ops.decode`: q ``[B, H, D]`` -> ``[B, H, D]``."""
    tiles = decode_tiles(q, k_cache, v_cache, seqlens_k, block_table, window_left)
    if tiles is None:
        return torch.zeros_like(q)
    return _attend_decode(tiles, scale)
