"""The split-KV decode kernel's launch plan (decode_kernel.py): its Config, the static config
table, the split count and the rules that pick a pipeline from static facts only (shapes, dtypes,
the SM count), each with the measurement behind it. No autotuning: a plan must be the same at
every call of a signature, so CUDA graphs replay what was captured.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from attn_ops.backends.triton.common import INTERPRET, next_pow2
from attn_ops.backends.triton.split_counters import COUNT_LIMIT


class Config(NamedTuple):
    """Launch parameters of stage 1 (``maxnreg``: a register cap per thread, None: Triton's)."""
    block_n: int
    warps: int
    stages: int
    maxnreg: int | None = None


# Stage-1 programs to aim for, in multiples of the SM count, and the fewest keys worth a split.
_TARGET_WAVES, _MIN_SPLIT_KEYS, _MAX_SPLITS = 3, 256, 64
_ONE_SEQUENCE = 8  # (sequence, kv head) programs up to which num_splits splits to the maximum
# At most 128 registers: 4 programs per SM (uncapped: 146 without splits, 3 per SM, 186 vs
# 138 us at B 64 x 4096). With FP8_PAIRS, H200 graph replays vs bf16 at (64, 4, 3): 78.0 vs
# 132.5 us at B 16 x 8192 (1.70x; 1.67x against bf16's DEEP_CONFIG, 130.0), 138.1 vs 249.2 at
# 64 x 4096 (1.80x), 139.1 vs 252.4 at 32 x 8192 (1.81x), 45.3 vs 72.7 at 16 x 4096 (1.60x).
# 64 or 32 keys, 5-9 stages or 8 warps: 1-35% slower; at B 16, 2 or 3 splits (fused merge,
# 2-5 stages): 6-45% slower than 4.
FP8_CONFIG = Config(128, 4, 2, 128)

# Programs of DEFAULT_CONFIG that one SM holds at once (128 registers per thread, 39 KB of shared
# memory): where the wave rule's splits pass that many, the last wave runs nearly empty. H200,
# bf16, Hkv 8, pages of 16, graph replays (BENCHMARKS.md, fourteenth pass), the wave rule's
# count vs this one's: B 23 x 2048 (3 splits, 552 programs) 67.6 vs 53.4 us (2), x 8192 249.5 vs
# 186.7; B 24 x 2048 69.3 vs 54.3 (2); B 34 (2) 97.2 vs 80.5 (3), x 8192 370 vs 288; B 40 (2)
# 108 vs 87.3 (3), x 8192 407 vs 309; B 48 (2) 113 vs 98.8 (1), x 8192 418 vs 372. B 17 and 20
# (3 splits, one wave) keep their count: 42.5 and 46.5 us, the best of the counts measured.
DEFAULT_CONFIG = Config(64, 4, 3)
DEFAULT_RESIDENT = 4


def num_splits(batch: int, num_kv_heads: int, capacity: int, sms: int, block_n: int,
               resident: int = 0) -> int:
    """Split count from static shapes only: enough (b, kv head, split) programs for
    ``_TARGET_WAVES * sms``, no split shorter than ``_MIN_SPLIT_KEYS`` of the table's capacity
    (``block_table width * page``), at most ``_MAX_SPLITS`` (stage 2 holds them in registers).
    ``resident`` (programs of the launch's config one SM holds at once; 0: unknown): where that
    rule splits, the count of at most ``max(its count, _TARGET_WAVES)`` that takes the fewest
    waves of ``resident * sms`` programs per split's length (ties: fewer splits).

    H100 sweeps (BENCHMARKS.md): within 2% of the best fixed count (B 16: S 4, B >= 64: S 1).
    The plan prefers :func:`few_sequence_splits` and :func:`deep_splits` where they apply
    (half-precision caches on a GPU).
    """
    programs = batch * num_kv_heads
    if programs == 0 or capacity <= 0:
        return 1
    if programs <= _ONE_SEQUENCE:
        # One sequence's kv heads: as many splits as allowed, down to half the usual length.
        # H200, B 1, Hkv 8, graph replays: 64 splits vs the rule's 50 at 32k keys 42.9 vs
        # 47.2 us (SDPA 40.9), vs its 32 at 8k 20.1 vs 20.8 (SDPA 19.5); 96 or 128 splits
        # are slower again (45.3-48.3 us at 32k).
        return max(1, min(capacity // max(_MIN_SPLIT_KEYS // 2, block_n), _MAX_SPLITS))
    return wave_splits(programs, capacity, sms, block_n, resident)


def wave_splits(programs: int, capacity: int, sms: int, block_n: int, resident: int = 0) -> int:
    """The wave rule of :func:`num_splits` for ``programs`` (sequence or tile, kv head)
    programs, and with ``resident`` > 0 the count that fits the SMs (also the unified kernel's
    small path: unified_plan.num_splits)."""
    if programs <= 0 or capacity <= 0:
        return 1
    want = triton.cdiv(_TARGET_WAVES * sms, programs)
    by_length = max(1, capacity // max(_MIN_SPLIT_KEYS, block_n))
    if resident <= 0 or want == 1:
        return max(1, min(want, by_length, _MAX_SPLITS))
    # Among 1 .. top, the count whose programs take the fewest waves of resident * sms (what
    # the SMs hold at once) per split's length; ties: fewer splits.
    top = max(1, min(max(want, _TARGET_WAVES), by_length, _MAX_SPLITS))
    return min(range(1, top + 1),
               key=lambda s: (triton.cdiv(programs * s, resident * sms) / s, s))


# Batches whose (sequence, kv head) programs, times a split count, give each SM about two
# programs at once (1.55-2 per SM): a deeper pipeline instead of more splits. Triton 3.6
# double-buffers the paged K/V loads only from 5 stages (one buffer at 3 or 4: 39 vs 72 KB of
# shared memory), which pays where programs are few and costs 20-23% where 3+ share an SM (B 16
# at 4 splits, B 64). H200, bf16, Hkv 8, graph replays, vs the wave rule at (64, 4, 3): B 13 x
# 4096 (2 splits) 62.2 vs 63.6 us (and vs WIDE_CONFIG at 1 split: 63.8); B 28 x 2048 (1) 62.3
# vs 65.6; B 32 (1) 69.1 vs 72.2 at 2048 (SDPA 67.4), 126.0 vs 129.6 at 4096. Below: B 25 x
# 8192 (1.52 per SM) 215.3 vs 209.1. One sequence (B 1, 32 splits, launched merge) vs the
# _ONE_SEQUENCE rule's 64 at (64, 4, 3): 41.2 vs 42.5 us at 32k keys (cuDNN 40.4), 18.7 vs
# 19.6 at 8k (19.0); vs WIDE_CONFIG at 16 splits: 42.7 (launched merge), 43.6 (fused).
DEEP_CONFIG = Config(64, 4, 5)
# Batches whose programs, times a split count, give each SM about one program (0.95-1 per SM):
# 128-key tiles, 5 stages (two 64 KB K/V buffers, 140 KB of shared memory), no split shorter than
# _WIDE_MIN_KEYS. H200 bf16 graph replays, same run, vs the rules before (cuDNN SDPA): B 16 (1
# split) x 1024 23.6 vs 26.0 us (22.6), x 2048 38.8 vs 40.9 (36.9), x 4096 69.3 vs 70.8 (66.9), x
# 8192 129.2 vs 132.3 (125.6); B 8 x 4096 (2 splits) 40.1 vs 44.4 (40.3); B 4 x 8192 (4) 40.2 vs
# 43.9 (40.0); B 13 (0.79 per SM) 63.8 vs DEEP's 62.2 in that run (the decode's WIDE now starts at
# 0.75 per SM unsplit, as measured since: _DECODE_WIDE_PER_SM). B 16 x 2048, 1 split: 64-key tiles
# 47.5-49.8 us at 5, 7 or 9 stages; (128, 4, 7) 40.4.
WIDE_CONFIG = Config(128, 4, 5)
_WIDE_MIN_KEYS = 512
_WIDE_PER_SM = 0.95


def deep_splits(programs: int, sms: int, capacity: int, most: int = 2,
                unsplit_wide_per_sm: float = _WIDE_PER_SM) -> tuple[int, Config] | None:
    """(splits, config) of the deep rows, or None: WIDE_CONFIG where a split count gives each SM
    0.95-1 programs of >= ``_WIDE_MIN_KEYS`` keys (unsplit: from ``unsplit_wide_per_sm``), else
    DEEP_CONFIG where one gives it 1.55-2 (the fewest of 1 .. ``most`` splits; a power of two for
    one sequence's heads, up to ``_ONE_SEQUENCE`` programs, which never take WIDE), none shorter
    than ``_MIN_SPLIT_KEYS`` keys of ``capacity``. The unified kernel's few-query plans take
    ``most`` = 2 and WIDE from 0.95 per SM, as measured there; the decode takes more
    (:func:`half_precision_row`)."""
    if programs <= 0:
        return None
    one = programs <= _ONE_SEQUENCE
    wide = 0 if one else min(sms // programs, _MAX_SPLITS, capacity // _WIDE_MIN_KEYS)
    least = unsplit_wide_per_sm if wide == 1 else _WIDE_PER_SM
    if wide > 0 and programs * wide >= least * sms:
        return wide, WIDE_CONFIG
    for splits in (next_pow2(2 * sms // programs + 1) // 2,) if one else range(1, most + 1):
        if 1.55 * sms < programs * splits <= 2 * sms and splits <= _MAX_SPLITS and (
                splits == 1 or capacity >= splits * _MIN_SPLIT_KEYS):
            return splits, DEEP_CONFIG
    return None


# Few sequences, whose (sequence, kv head) programs reach one per SM only at two splits or more:
# WIDE_CONFIG at ``sms // programs`` splits (0.9-1 programs per SM), down to one 128-key tile per
# split. The fused merge with split_counters.last_to_count_in made short splits pay (before it, one
# sequence at WIDE_CONFIG's 16 splits lost: 42.7 against 41.2 us at 32k keys). H200, bf16, 32/8
# heads, graph replays over SDPA's contiguous cache (BENCHMARKS.md, twentieth pass), vs the
# rules before (SDPA): B 1 x 2048 (16 splits) 11.94 vs 12.48 us (12.48), x 4096 14.37 vs 15.30
# (15.39), x 8192 17.44 vs 18.34 (18.88), x 16384 24.45 vs 25.66 (25.82), x 32768 38.78 vs 40.00
# (39.87); B 2 x 2048 (8) 14.02 vs 15.62 (15.04); B 3 x 2048 (5) 15.84 vs 17.22 (16.13), x 8192
# 31.78 vs 34.94 (33.25); B 5 x 8192 (3) 46.14 vs 48.61 (47.49). Not taken: B 6 (two splits,
# 0.73 per SM) 33.38 vs 34.50, where DEEP_CONFIG at 5 splits ran 31.81 (SDPA 33.18); B 12 at
# one split 55.17 vs 54.11.
_FEW_WIDE_PER_SM = 0.9


def few_sequence_splits(programs: int, sms: int, capacity: int) -> int | None:
    """WIDE_CONFIG's split count for ``programs`` (sequence, kv head) pairs over a table of
    ``capacity`` keys where one program per SM needs two splits or more: ``sms // programs``,
    each at least one WIDE tile, if that gives each SM 0.9-1 programs; else None."""
    if programs <= 0:
        return None
    splits = min(sms // programs, _MAX_SPLITS, capacity // WIDE_CONFIG.block_n)
    return splits if splits >= 2 and programs * splits >= _FEW_WIDE_PER_SM * sms else None


# The decode's DEEP row at any split count that gives each SM 1.55-2 programs, not only 1 or 2:
# B 6-11 at 8 kv heads, which reach no such band at 1 or 2 splits nor 0.9 per SM at WIDE. H200,
# bf16, graph replays over SDPA's cache (BENCHMARKS.md, twentieth pass), DEEP at 3-5 splits vs
# the wave rule's row (SDPA): B 6 x 4096 (5) 32.32 vs 34.85 us (32.96); B 7 x 4096 (4) 35.87 vs
# 36.45 (37.34); B 9 x 4096 (3) 44.26 vs 44.90 (47.23); B 10 x 4096 (3) 47.46 vs 49.09 (48.58);
# B 11 x 8192 (3) 91.62 vs 93.60 (93.92).
_DEEP_MOST_SPLITS = _MAX_SPLITS
# and WIDE unsplit from 0.75 programs per SM, not 0.95: B 13-15 at 8 kv heads (0.79-0.91 per SM),
# which took DEEP at 2 splits (WIDE at 2 splits below 0.95, B 7: not measured, not taken). H200,
# bf16, graph replays over SDPA's cache (BENCHMARKS.md, twenty-first pass), WIDE (the balanced
# kernel) vs DEEP at 2 splits (SDPA): B 13 x 2048 32.51 vs 34.62 us (32.00), x 8192 103.04 vs 106.11
# (103.49); B 14 x 2048 34.11 vs 35.65 (34.66), x 4096 59.87 vs 61.06 (59.33); B 15 x 2048 35.97 vs
# 37.15 (35.14), x 8192 117.50 vs 119.30 (116.99); B 13 x 4096 55.90 vs 57.63 (55.62), x 16384
# 196.42 vs 201.57 (198.18). The balanced kernel comes with it: B 14 of one 16384 and 13 of 1024,
# pages of 16, 43.52 vs 150.18. Not B 12 (0.73 per SM): x 2048 31.68 vs 32.67, but x 4096 54.66 vs
# 54.37 (SDPA 52.61); nor B 10 (0.61): x 4096 53.95 vs DEEP at 3 splits' 46.88.
_DECODE_WIDE_PER_SM = 0.75


def half_precision_row(programs: int, sms: int, capacity: int) -> tuple[int, Config] | None:
    """(splits, config) of a half-precision cache's decode on a GPU when nothing is forced:
    :func:`few_sequence_splits`' WIDE row, else :func:`deep_splits`' rows at up to
    ``_DEEP_MOST_SPLITS`` splits and WIDE unsplit from ``_DECODE_WIDE_PER_SM``, else None (the
    wave rule's DEFAULT_CONFIG row)."""
    few = few_sequence_splits(programs, sms, capacity)
    return (few, WIDE_CONFIG) if few else deep_splits(programs, sms, capacity,
                                                      _DEEP_MOST_SPLITS, _DECODE_WIDE_PER_SM)


# FP8 caches where a split count gives each SM 1.55-3 programs (1, 2 or 4 splits): 128-key tiles,
# 5 stages (two 32 KB K/V buffers: 75 KB of shared memory with the rest) and at most 168
# registers (162 used, no spill; FP8_CONFIG's cap of 128 spills 16 bytes), so three programs fit
# an SM. The FP8 tile needs more instructions per byte than bf16's (FP8_PAIRS), which one
# program per SM cannot hide (B 16 x 4096 at 1 split: 46.5 us) and four per SM at 2 stages
# (FP8_CONFIG) hide with a single buffer. H200, bf16 q, 32/8 heads, pages of 16, graph replays,
# vs FP8_CONFIG's row (BENCHMARKS.md, seventeenth pass): B 8 x 4096 (4 splits) 26.0 vs 29.4 us,
# x 8192 41.3 vs 48.2; B 13 x 4096 (2) 40.0 vs 40.6; B 16 x 4096 (2) 41.2-41.4 vs 43.3-43.5,
# x 8192 72.6 vs 75.4; B 20 x 4096 (2) 53.8 vs 54.0; B 24 x 4096 (2) 59.7 vs 76.9; B 32 x 4096
# (1) 70.3 vs 75.3, x 2048 39.7 vs 43.3; B 40 x 4096 (1) 96.7 vs 112.4; B 48 x 4096 (1) 105.1
# vs 122.4. Not taken: B 16 at 3 splits (2.9 per SM) 43.5, 4 (two waves) 54.6; 6 or 7 stages
# no faster (41.4, 43.7); a cap of 160 or less 2-10% slower; 8 warps 22-40% slower; the
# balanced kernel 4-10% slower at uniform lengths. B 64 x 2048 at 1 split (3.9 per SM, two
# waves): 92.9 vs 74.3, so past 3 per SM FP8_CONFIG stays.
FP8_DEEP_CONFIG = Config(128, 4, 5, 168)
_FP8_DEEP_PER_SM = (1.55, 3.0)
_FP8_DEEP_MIN_KEYS = 512  # keys per split at the least (4 tiles)


def fp8_deep_splits(programs: int, sms: int, capacity: int) -> int | None:
    """The split count of FP8_DEEP_CONFIG for ``programs`` (sequence, kv head) pairs over a
    table of ``capacity`` keys: the fewest of 1, 2, 4 that gives each SM 1.55-3 programs with
    at least _FP8_DEEP_MIN_KEYS keys per split, or None (more than _ONE_SEQUENCE pairs only:
    one sequence keeps num_splits' rule)."""
    if programs <= _ONE_SEQUENCE:
        return None
    low, high = _FP8_DEEP_PER_SM
    for splits in (1, 2, 4):
        if (low * sms <= programs * splits <= high * sms
                and (splits == 1 or capacity >= splits * _FP8_DEEP_MIN_KEYS)):
            return splits
    return None


def launch_config(head_dim: int, dtype: torch.dtype, fp8: bool = False) -> Config:
    """Stage-1 launch parameters from a static table (no autotuning: CUDA graphs)."""
    if INTERPRET:
        return Config(16, 4, 1)
    if dtype == torch.float32 or head_dim > 128:
        return Config(32, 4, 2)
    if fp8:
        # An FP8 key row is half a bf16 one: twice the keys per tile keep as many bytes in
        # flight (see FP8_CONFIG for the measurements).
        return FP8_CONFIG
    # 64 keys x 4 warps x 3 stages: best or within 2% of the best of 10 variants on every swept
    # shape (graph-timed, H100); 8 warps cost 3-17%, 128 keys 1-11%; an evict_first hint on the
    # K/V loads changed nothing (+-0.3%).
    return Config(64, 4, 3)


# The balanced decode kernel (decode_balanced_kernel.py) by default where the plan's row is
# WIDE_CONFIG or DEEP_CONFIG at one split: about one or two programs per SM, so its ~210-236
# registers per thread (the split kernel's rows: 123-186) cost no residency. H200 graph replays,
# bf16, 32/8 heads, pages of 16 (BENCHMARKS.md, fifteenth pass), split vs balanced: skewed
# lengths B 16, one of 16384 and 15 of 1024: 223.7 vs 47.0 us; two of 8192 and 14 of 512: 116.4
# vs 42.7; B 32, two of 16384 and 30 of 1024: 331.6 vs 74.7; B 16 of U(1, 32768): 433.4 vs
# 291.3; B 32 of U(1, 8192): 200.0 vs 151.9. Uniform lengths cost 1-3% (B 16 x 2048 36.5 vs
# 37.6, 16 x 8192 127.4 vs 128.6, 32 x 4096 126.8 vs 127.7: the prologue that reads every
# length). Rows of 3-4 programs per SM lose half their residency (B 64 x 2048: 127.6 vs 159.7;
# skewed B 64, 4 of 16384 and 60 of 512: still 459.9 vs 149.1), and split plans pay the pieces'
# merges (B 2 x 8192, 8 splits: 23.1 vs 28.7): those keep the split kernel. Each program reads
# every sequence's length (a [next_pow2(B)] vector), so the batch is capped.
BALANCED = True
_BALANCED_MAX_BATCH = 1024


def balanced_applies(batch: int, num_kv_heads: int, capacity: int, config: Config) -> bool:
    """Whether the balanced kernel can take a launch of ``batch`` sequences over a table of
    ``capacity`` keys in ``config``'s key tiles: two sequences or more (one has nothing to
    balance), at most _BALANCED_MAX_BATCH, a tile count that fits its int32 arithmetic, and
    fewer tiles per sequence than its merge's counter holds (split_counters.COUNT_LIMIT: 2M keys at
    64-key tiles)."""
    tiles = triton.cdiv(capacity, config.block_n)
    return (2 <= batch <= _BALANCED_MAX_BATCH and batch * num_kv_heads * tiles < 2 ** 31
            and tiles < COUNT_LIMIT)


def balanced_default(config: Config, splits: int) -> bool:
    """The default choice for a launch :func:`balanced_applies` allows (see BALANCED)."""
    return BALANCED and splits == 1 and config in (WIDE_CONFIG, DEEP_CONFIG)


def zeros_first(config: Config) -> bool:
    """Whether the balanced kernel zeroes a decode's sequences with no visible key before its
    walk (its ``ZEROS_FIRST``: at the WIDE row, where after the walk the lse's store cost the
    key loop its MMA interleaving; at the DEEP row it spills there instead)."""
    return config == WIDE_CONFIG


# The Gluon Hopper decode (hopper_decode_kernel.py) takes a plain half-precision one-token
# decode on an sm90 GPU (no window, softcap, sinks, lse or FP8 cache; a cache TMA can read)
# while its (sequence, KV head) pairs fill 0.75 to 2 programs per SM. H200, bf16, 32/8 heads,
# graph replays, us, Gluon vs the Triton kernels (BENCHMARKS.md, twenty-fifth pass): skewed
# batches over SDPA's cache, 4 x 8192 + 12 x 512 keys 50.6 vs 56.7, 32 of 1-8192 130.5 vs
# 152.8, 1 x 16384 + 15 x 1024 41.9 vs 42.3; uniform B 16 x 1024 22.8 vs 23.8, x 2048 37.8 vs
# 38.2, B 20 x 2048 46.8 vs 47.6, B 33 x 2048 69.1 vs 70.0. It trails by up to 2% at B 13 x
# 8192 (107.1 vs 105.0), B 24 x 8192 (191.1 vs 187.6) and B 28 x 4096 (115.5 vs 113.8). Below
# 0.75 per SM its one program per pair leaves SMs idle and more programs split every pair (B 8
# x 4096: 55.1 us at 64 programs, 41.3 at 132, against 39.0; B 12 x 4096 56.2 vs 55.4); past
# two per SM it deals tiles over 264 programs and loses to the Triton kernels' one wave (B 48 x
# 2048: 101.4 vs 98.0).
HOPPER_DECODE = True
_HOPPER_PAIRS_PER_SM = (0.75, 2.0)  # the upper end: hopper_decode_launch.RESIDENT


def hopper_decode_applies(batch: int, num_kv_heads: int, sms: int) -> bool:
    """Whether a plain decode of these shapes goes to the Gluon Hopper decode where it can run
    (see HOPPER_DECODE; the caller checks the device, the call and the caches)."""
    low, high = _HOPPER_PAIRS_PER_SM
    return (HOPPER_DECODE and not INTERPRET
            and low * sms <= batch * num_kv_heads <= high * sms)
