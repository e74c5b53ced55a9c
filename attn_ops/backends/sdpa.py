"""sdpa backend: PyTorch's fused ``F.scaled_dot_product_attention`` on padded tiles, any device.

The fast pure-torch backend, and "auto"'s choice on CPU. Variable-length and paged batches are
gathered into padded ``[B, H, max_len, D]`` tiles exactly as the reference does (same helpers),
and the contract's mask (padding, bottom-right causal, window) goes to SDPA as one boolean
``[B, 1, Mq, Mk]`` mask, so PyTorch's fused kernels do the softmax(QK^T)V with fp32 accumulation
and never materialise fp32 scores the way the reference oracle does. On a 2-layer CPU model at
S=1024 the reference was 9.6x slower than Inductor's own SDPA (benchmarks/bench_substitution.py);
this backend removes that gap. No softcap (SDPA has none): ``supports`` says so.

Rows that see no key come out of SDPA as NaN (softmax of an empty row); they are zeroed with
``torch.where``, as the contract requires, with no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attn_ops.backends.reference import (_paged_rows, _scatter_tokens, allowed_pairs,
                                         gather_prefill, store_kvcache)

name = "sdpa"

__all__ = ["name", "supports", "store_kvcache", "prefill", "decode"]


def supports(op: str, **config) -> str | None:
    if op == "store_kvcache":
        return None  # the reference's vectorised index_copy_ (no SDPA involved)
    if config.get("softcap", 0.0) > 0:
        return "softcap is not expressible through F.scaled_dot_product_attention"
    return None


def _attend(qp, kp, vp, allowed, scale):
    """qp ``[B, Mq, H, D]``, kp/vp ``[B, Mk, Hkv, D]``, allowed ``[B, 1, Mq, Mk]`` -> ``[B, Mq, H, D]``."""
    o = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),
                                       attn_mask=allowed, scale=scale,
                                       enable_gqa=qp.shape[2] != kp.shape[2])
    o = o.transpose(1, 2)
    sees_a_key = allowed.any(dim=-1).transpose(1, 2)[..., None]  # [B, Mq, 1, 1]
    return torch.where(sees_a_key, o, torch.zeros((), dtype=o.dtype, device=o.device))


def prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal=True,
            block_table=None, window_left=-1, softcap=0.0):
    """As :func:`attn_ops.prefill`: q ``[Tq, H, D]`` -> ``[Tq, H, D]``."""
    tiles = gather_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           block_table)
    if tiles is None:
        return torch.zeros_like(q)
    qp, kp, vp, q_valid, k_valid, lq, lk = tiles
    allowed = allowed_pairs(q_valid, k_valid, lq, lk, causal, window_left)[:, None]
    return _scatter_tokens(_attend(qp, kp, vp, allowed, scale), cu_seqlens_q, q.shape[0])


def decode(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left=-1, softcap=0.0):
    """As :func:`attn_ops.decode`: q ``[B, H, D]`` -> ``[B, H, D]``."""
    b, _, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    max_len = block_table.shape[1] * block_size
    if b == 0 or max_len == 0:
        return torch.zeros_like(q)
    lk = seqlens_k.to(torch.int64)
    slots, k_valid = _paged_rows(block_table, lk, max_len, block_size)
    ones = torch.ones(b, 1, dtype=torch.bool, device=q.device)
    allowed = allowed_pairs(ones, k_valid, torch.ones_like(lk), lk, True, window_left)[:, None]
    o = _attend(q[:, None], k_cache.view(-1, hkv, d)[slots], v_cache.view(-1, hkv, d)[slots],
                allowed, scale)
    return o[:, 0]
