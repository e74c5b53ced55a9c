"""What the decode benchmarks share (bench_decode.py and its sections): the model shape,
the bytes a decode reads, the plan the Triton decode picks, and shuffled paged copies of K/V."""

from __future__ import annotations

import torch
import torch.nn.functional as F


H, HKV, D = 32, 8, 128


def kv_bytes(b, ctx, hkv=HKV, d=D) -> int:
    return 2 * b * ctx * hkv * d * 2


def default_plan(b, hkv, capacity, d, q, cfg=None):
    """(splits, Config) the half-precision decode picks without overrides (``cfg``: a fixed
    config, then only the split rules apply), as decode_kernel._plan does."""
    from attn_ops.backends.triton import decode_plan as dp
    from attn_ops.backends.triton.common import device_sm_count
    sms = device_sm_count(q.device)
    deep = cfg is None and dp.half_precision_row(b * hkv, sms, capacity)
    if deep:
        return deep
    config = dp.Config(*(cfg or dp.launch_config(d, q.dtype)))
    resident = dp.DEFAULT_RESIDENT if config == dp.DEFAULT_CONFIG else 0
    return dp.num_splits(b, hkv, capacity, sms, config.block_n, resident), config


def paged_copy(k, v, page, gen_device):
    """[B, ctx, Hkv, D] K/V -> shuffled paged caches [blocks, page, Hkv, D] and a block table
    [B, ctx/page]."""
    b, ctx, hkv, d = k.shape
    per_seq = -(-ctx // page)
    num_blocks = b * per_seq
    perm = torch.randperm(num_blocks, device=gen_device)
    table = perm.view(b, per_seq).to(torch.int32)
    k_cache = torch.empty(num_blocks, page, hkv, d, dtype=k.dtype, device=k.device)
    v_cache = torch.empty_like(k_cache)
    pad = per_seq * page - ctx
    kp = F.pad(k, (0, 0, 0, 0, 0, pad)).view(b * per_seq, page, hkv, d)
    vp = F.pad(v, (0, 0, 0, 0, 0, pad)).view(b * per_seq, page, hkv, d)
    k_cache[perm] = kp
    v_cache[perm] = vp
    return k_cache, v_cache, table
