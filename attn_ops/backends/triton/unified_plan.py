"""The unified kernel's launch plan (unified_kernel.py): its static config table, the split
count and the rules that pick a pipeline from static facts only (shapes, dtypes, the SM count),
each with the measurement behind it. No autotuning: a plan must be the same at every call of a
signature, so CUDA graphs replay what was captured.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from attn_ops.backends.triton import common, decode_plan
from attn_ops.backends.triton.common import (INTERPRET, device_has_pdl, device_is_sm90,
                                             device_sm_count, dot_mode, next_pow2, pdl_launch)


class Config(NamedTuple):
    """Launch parameters: rows of a small-path tile (0: no small path), rows of a large-path tile
    (0: no large path), keys per step, warps, pipeline stages; ``one_loop``: the small path walks
    its keys in one masked loop (else masked / unmasked / masked loops, as the large path);
    ``fused``: the last split program merges (else a second launch, :func:`_merge_kernel`)."""
    small_m: int
    block_m: int
    block_n: int
    warps: int
    stages: int
    one_loop: bool = True
    fused: bool = True  # see decode_kernel.FUSED_MERGE (counters: split_counters.semaphores)


# Split-KV: the decode kernel's rule (decode_plan.wave_splits) over (tile, kv head) programs.
# The last split program merges up to this many splits (decode_kernel._FUSED_MAX_SPLITS).
_FUSED_MAX_SPLITS = 8
# Packed rows up to which a sequence is one small-path tile: 64 = 16 queries at G = 4.
_SMALL_ROWS_MAX = 64
# 32-row small tiles over a paged cache (plan): WIDE unsplit from this many programs per SM,
_WIDE_32_ROWS_MIN = 0.7
# and at WIDE's one split, 64-row (wgmma) tiles in two splits from this many keys.
_WGMMA_SPLIT_MIN_KEYS = 8192


def launch_config(max_rows: int, head_dim: int, dtype: torch.dtype) -> Config:
    """Static table from the packed-row bound ``max_seqlen_q * G`` (no autotuning: graphs)."""
    if INTERPRET:
        return Config(16, 0 if max_rows <= 16 else 16, 16, 4, 1)
    wide = dtype == torch.float32 or head_dim > 128
    if 16 < max_rows <= 32 and not wide:
        # 32 packed rows (8 queries at G = 4): 128-key steps. H200, bf16, D 128, B 16/64 over
        # 2048/8192 keys: 1.17-1.24x the one-token decode's time vs 1.45-1.57x with 64-key
        # steps (32-key steps 2.0x; BENCHMARKS.md, "few queries").
        return Config(32, 0, 128, 4, 3)
    if max_rows <= _SMALL_ROWS_MAX:  # decode, speculative verification: memory-bound
        return Config(max(16, next_pow2(max_rows)), 0, 32 if wide else 64, 4, 2 if wide else 3)
    if wide:
        return Config(16, 64, 32, 4, 2)
    # 64-row large tiles, 4 warps (H200, bf16, D = 128): the mixed batch of BENCHMARKS.md in
    # 573 us vs 733 with 128 x 64 / 8 warps; short prompts within -2% .. +5% of 128 x 64.
    return Config(16, 64, 64, 4, 3)


# The 16-row small path's row, of which an SM holds 4 programs at once, as the decode kernel's
# default row (decode_plan.DEFAULT_RESIDENT): the split count that fits them (the same rule).
# H200, bf16 32/8, pages of 16, 2048 keys, 1 / 4 queries, graph replays (BENCHMARKS.md,
# fourteenth pass), the wave rule's count vs this one's: B 24 (3 splits) 71.6 / 74.9 vs 61.2 /
# 63.7 us (2); B 34 (2) 99.8 / 103.7 vs 85.8 / 89.5 (3); B 40 (2) 109.0 / 112.5 vs 90.7 / 95.8
# (3); B 48 (2) 118.8 / 120.6 vs 104.0 / 106.3 (1); B 17 and 20 keep 3 (the best measured).
_SMALL_16 = Config(16, 0, 64, 4, 3)


def num_splits(programs: int, capacity: int, sms: int, block_n: int, resident: int = 0) -> int:
    """Split count from static shapes only (decode_plan.wave_splits; ``resident``: programs an
    SM holds at once, 0 for the wave rule alone)."""
    return decode_plan.wave_splits(programs, capacity, sms, block_n, resident)


@functools.lru_cache(maxsize=1024)
def plan(total_q: int, num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int,
          max_seqlen_q: int, capacity: int, dtype: torch.dtype, device: torch.device,
          decode: bool, causal: bool, paged: bool, page: int, window: bool, softcap: bool,
          config: Config | None, splits: int | None):
    """Grid, split count and constexprs from static facts only (cached: ~1 us per call)."""
    group = num_heads // num_kv_heads
    cfg = config or launch_config(max_seqlen_q * group, head_dim, dtype)
    n_small = num_seqs if cfg.small_m else 0
    n_large = (total_q * group) // cfg.block_m + num_seqs if cfg.block_m else 0
    # Small tiles alone, paged, about one (tile, kv head) program per SM: the decode kernel's
    # WIDE pipeline (128-key steps, 5 stages, its split count). H200 graph replays, B 16 x
    # 2048 keys, 1 / 2 / 4 / 8 queries: 39.9 / 41.5 / 41.7 / 46.8 us vs 42.9 / 44.7 / 45.2 / 53.4
    # (the one-token decode 38.8); x 4096 and x 8192 -3 to -9%; at B 64 it loses (not taken).
    free = (config is None and splits is None and paged and not cfg.block_m and not INTERPRET
            and head_dim <= 128 and dtype in (torch.float16, torch.bfloat16))
    programs, sms = n_small * num_kv_heads, device_sm_count(device) if free else 0
    deep = free and decode_plan.deep_splits(programs, sms, capacity)
    wide = decode_plan.WIDE_CONFIG
    wgmma = free and cfg.small_m == 32 and device_is_sm90(device)
    if wgmma and (programs > sms or (deep == (1, wide) and capacity >= _WGMMA_SPLIT_MIN_KEYS)):
        # 8 queries at G = 4: 32-row tiles padded to 64 rows, where Triton issues Hopper's
        # wgmma, 64-key steps, 5 stages; one split past one program per SM, else two. H200
        # graph replays over the one-token decode, vs 32 rows: B 64 1.104 / 1.055x at 2048 /
        # 8192 keys (1.200 / 1.161), B 32 1.073 / 1.030 (1.226 / 1.167), B 20 x 4096 1.468
        # (1.701); B 16 (2 splits) x 8192 1.149 (WIDE: 1.182), x 16384 1.113 (1.176), x 4096
        # 1.204 (1.202), x 2048 1.287 (1.218, so WIDE stays there).
        splits = 1 if programs > sms else 2
        cfg = cfg._replace(small_m=64, block_n=64, stages=5)
    elif deep and deep[1] == wide:
        splits, cfg = deep[0], cfg._replace(block_n=wide.block_n, stages=wide.stages)
    elif free and cfg.small_m == 32 and _WIDE_32_ROWS_MIN * sms <= programs <= sms:
        # 32-row tiles split dearly (a 32-row merge), so fewer programs take WIDE unsplit.
        # H200, B 12 x 4096, 8 queries (0.73 per SM): 79.5 us vs 101.6 at the rule's 3 splits
        # and 83.4 at 2 (the one-token decode: 56.6).
        splits, cfg = 1, cfg._replace(block_n=wide.block_n, stages=wide.stages)
    if splits is None:
        real_tiles = n_small if not cfg.block_m else (total_q * group) // cfg.block_m + num_seqs
        # A 32-row small tile does twice a 16-row tile's work per key, so it counts twice
        # (H200, B 16 x 8 queries over 2048 keys: 2 splits 53.0 us, 4 splits 57.8).
        weight = 2 if cfg.small_m == 32 and not cfg.block_m else 1
        splits = num_splits(real_tiles * num_kv_heads * weight, capacity,
                            device_sm_count(device), cfg.block_n,
                            decode_plan.DEFAULT_RESIDENT if cfg == _SMALL_16 else 0)
    if config is None and causal and splits == 1 and 2 < cfg.stages < 5 and cfg.small_m < 32:
        # H200, B = 64 sequences of 1-4 queries, ctx 2048, one split: 3 stages 176 us, 2 stages
        # 132 us (the one-token decode: 130); with splits (B = 16) 3 stages measured at parity.
        # 32-row tiles (8 queries) keep 3: B 64 x 2048 154.4 vs 157.8 us, x 8192 564.4 vs 576.2.
        cfg = cfg._replace(stages=2)
    grid = (n_small + n_large + 1, num_kv_heads, splits)
    consts = dict(GROUP=group, HEAD_DIM=head_dim, D_P2=max(16, next_pow2(head_dim)),
                  SMALL_M=max(cfg.small_m, 16), BLOCK_M=max(cfg.block_m, 16),
                  BLOCK_N=cfg.block_n, SMALL_PATH=cfg.small_m > 0, LARGE_PATH=cfg.block_m > 0,
                  SEARCH_STEPS=max(1, num_seqs.bit_length()), DECODE=decode, CAUSAL=causal,
                  WINDOW=window, SOFTCAP=softcap, PAGED=paged, PAGE=page, DIRECT=splits == 1,
                  ONE_LOOP=cfg.one_loop, FUSED=cfg.fused and 1 < splits <= _FUSED_MAX_SPLITS,
                  DOT=dot_mode(dtype),
                  num_warps=cfg.warps, num_stages=cfg.stages)
    merge = dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, D_P2=consts["D_P2"],
                 S_P2=next_pow2(splits), DECODE=decode, num_warps=4)
    return splits, grid, consts, merge


# Few queries per sequence over a paged cache at about one or two (sequence, kv head) programs
# per SM (the deep rows at one split): the balanced kernel (decode_balanced_kernel.py, QUERIES)
# deals the batch's key tiles out evenly, so a long sequence among short ones is not walked by
# its own few programs while the rest of the GPU idles (the unified kernel splits every
# sequence alike). Up to 16 packed rows (4 queries at G = 4), no window; see BENCHMARKS.md.
BALANCED = True
_BALANCED_MAX_ROWS = 16
# Pieces a merge loads per trip to L2 (merge_kernel.merge_pieces): a [rows, CHUNK, D] float32
# tile, at 16 rows 64 registers per thread with 4 (the decode's chunk, at its 4 rows); with 1,
# sm_90a ptxas fits the WIDE row in 231 registers without spilling (255 and 72 bytes with 4).
_MERGE_CHUNK = 1
# The WIDE row (one program per SM) with 8 warps, not the decode's 4: a single warp per
# scheduler left ptxas's schedule of this build's loop exposed (sm_90a: the QK^T MMAs one
# accumulator chain at a time, 28 more NOPs, where the decode build interleaves four; ncu: 3.95
# cycles per issued instruction against 3.58). H200 graph replays,
# B 16, 1 / 4 queries, the unified kernel vs 4 vs 8 warps: x 2048 39.7 / 41.9 vs 44.4 / 46.7
# vs 42.2 / 44.8 us; x 8192 129.7 / 131.7 vs 144.5 / 146.9 vs 136.0 / 138.4; one of 16384 and
# 15 of 1024: 243.5 / 245.4 vs 53.1 / 58.1 vs 51.3 / 56.8 (BENCHMARKS.md, sixteenth pass).
_WIDE_WARPS = 8


@functools.lru_cache(maxsize=1024)
def balanced_plan(num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int,
                  max_seqlen_q: int, capacity: int, dtype: torch.dtype, device: torch.device,
                  causal: bool, paged: bool, window: bool, fp8: bool, force: bool | None):
    """``(grid, constexprs)`` of the balanced kernel for a few-query prefill, or None where the
    unified kernel serves it: by default (``force`` None) a paged launch of at most
    _BALANCED_MAX_ROWS packed rows, bf16 / fp16 over a bf16 / fp16 cache (an FP8 cache's
    few-query path was not measured on it), D <= 128, whose plan is a deep row at one split;
    ``force`` True takes it wherever it can run (paged, no window, at most 32 rows,
    decode_plan.balanced_applies; that pipeline, else the decode's default row), False
    never."""
    group = num_heads // num_kv_heads
    rows = max_seqlen_q * group
    if force is False or not paged or window or rows > 32:
        return None
    deep = (not INTERPRET and head_dim <= 128 and dtype in (torch.float16, torch.bfloat16)
            and decode_plan.deep_splits(num_seqs * num_kv_heads, device_sm_count(device),
                                        capacity))
    if force is None and not (BALANCED and rows <= _BALANCED_MAX_ROWS and not fp8 and deep
                              and deep[0] == 1):
        return None
    # As many programs as the decode's split plan would launch (its deep row's pipeline)
    if deep:
        splits, cfg = deep
    else:
        cfg = decode_plan.launch_config(head_dim, dtype)
        splits = decode_plan.num_splits(
            num_seqs, num_kv_heads, capacity, device_sm_count(device), cfg.block_n,
            decode_plan.DEFAULT_RESIDENT if cfg == decode_plan.DEFAULT_CONFIG else 0)
    if not decode_plan.balanced_applies(num_seqs, num_kv_heads, capacity, cfg):
        return None
    warps = _WIDE_WARPS if cfg == decode_plan.WIDE_CONFIG else cfg.warps
    g_p2 = max(16, next_pow2(rows))
    consts = dict(GROUP=group, G_P2=g_p2, R_P2=g_p2, HEAD_DIM=head_dim,
                  D_P2=max(16, next_pow2(head_dim)), BLOCK_N=cfg.block_n,
                  B_P2=next_pow2(num_seqs), WINDOW=False, DOT=dot_mode(dtype), QUERIES=True,
                  CAUSAL=causal, CHUNK=_MERGE_CHUNK, num_warps=warps, num_stages=cfg.stages,
                  # FP8 caches widened in registers (every constexpr given: Inductor's launch
                  # of a traced call, wrap_triton, takes no defaults)
                  FP8_VIA_F16=False, FP8_PAIRS=False, PAIR_ASM=False, ZEROS_FIRST=False,
                  **pdl_launch(common.LAUNCH_PDL and device_has_pdl(device)))
    return (splits * num_seqs * num_kv_heads,), consts
