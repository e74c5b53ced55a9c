"""The split-KV paged decode Triton kernel (decode_kernel.py): the interpreter at tiny shapes (CI)
and, marked ``cuda``, compiled on a GPU; against the reference backend with NaN-poisoned outputs."""

from __future__ import annotations

import pytest
import torch

import attn_ops
from attn_ops.backends import reference
from tests.support.helpers import (TOLERANCES, assert_close, cu_seqlens, laid_apart, poisoned,
                                   prefill_f64, random_paged, record_launches)

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from attn_ops.backends.triton import decode_kernel, decode_plan  # noqa: E402  (imports triton)
from attn_ops.backends.triton.split_counters import last_to_count_in  # noqa: E402

HALF = (torch.float16, torch.bfloat16)
BF16, FP16 = torch.bfloat16, torch.float16
DEV = "cuda"


def _nan(shape, dtype):
    return poisoned(shape, dtype, DEV)



# ---------------------------------------------------------------------------------------------
# interpreter
# ---------------------------------------------------------------------------------------------

def _check_decode(lens, h, hkv, d, block_size, dtype, window_left=-1, softcap=0.0, splits=None,
                  table_width=None, fused=None):
    paged = random_paged(lens, hkv, d, block_size, dtype, table_width=table_width)
    q = torch.randn(len(lens), h, d, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    out = poisoned(q.shape, dtype)
    decode_kernel.decode(q, paged.k_cache, paged.v_cache, seqlens, paged.block_table, d ** -0.5,
                         window_left, softcap, splits=splits, out=out, fused=fused)
    ref = reference.decode(q, paged.k_cache, paged.v_cache, seqlens, paged.block_table,
                           d ** -0.5, window_left, softcap)
    assert_close(out, ref, *TOLERANCES[dtype], what="decode")
    return out


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("splits", [None, 1, 3, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_splits_and_padding(splits, block_size, fused):
    # seqlens 0 (padded row), 1, odd; 8 splits of a 40-token sequence leave splits empty;
    # fused: the last split program merges, else the second (merge) launch
    out = _check_decode([13, 0, 40, 1], 4, 2, 32, block_size, torch.bfloat16, splits=splits,
                        table_width=4, fused=fused)
    assert torch.all(out[1] == 0)


@pytest.mark.parametrize("window_left,softcap", [(5, 0.0), (-1, 3.0), (0, 2.0)])
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_window_softcap(window_left, softcap, splits):
    _check_decode([13, 37, 2], 4, 2, 32, 16, torch.float16, window_left, softcap, splits=splits)


@pytest.mark.parametrize("h,hkv,d", [(4, 1, 32), (2, 2, 64), (2, 1, 40)])
def test_decode_heads_and_dims(h, hkv, d):
    _check_decode([19, 6], h, hkv, d, 16, torch.float16, splits=2)


# The decode kernels keep the scores' lse for a row that sees a non-finite value behind a window
# (its output is NaN all the same; docs/api.md). The reference's rule (softmax.lse_of_output,
# as the prefill kernels apply it) grew the DEEP row's key loop from 500 to 540 instructions
# per step in the window + lse build (ptxas for sm_90a, Triton 3.6), unmeasured on a GPU, so it
# was not taken: these cases document the difference and fail loudly once it is closed.
_DECODE_LSE_GAP = pytest.mark.xfail(strict=True, reason="decode kernels: the scores' lse for a "
                                    "row that sees a non-finite value behind a window")


@pytest.mark.parametrize("kernel", ["split-1", "split-2", "balanced"])
@pytest.mark.parametrize("window_left", [-1, pytest.param(10, marks=_DECODE_LSE_GAP)])
def test_the_lse_of_a_row_that_sees_a_non_finite_value_is_the_references(kernel, window_left):
    """NaN value rows at keys 5 and 66 of a 70-token sequence (the second sequence clean),
    sinks on: with a window of 10, key 5 is hidden and 66 seen, and the reference gives the row
    a NaN lse (reference.poison_rows); with no window no key is hidden and every lse is the
    scores', the kernels' too, split or not, balanced or not."""
    torch.manual_seed(0)
    paged = random_paged([70, 40], 2, 32, 16, torch.float32)
    for pos in (5, 66):
        paged.v_cache[int(paged.block_table[0, pos // 16]), pos % 16] = float("nan")
    q = torch.randn(2, 4, 32)
    args = (q, paged.k_cache, paged.v_cache, torch.tensor([70, 40], dtype=torch.int32),
            paged.block_table, 0.2, window_left, 0.0, torch.randn(4) * 2)
    forced = (dict(balanced=True) if kernel == "balanced"
              else dict(splits=int(kernel[-1]), balanced=False))
    out, lse = decode_kernel.decode(*args, return_lse=True, **forced)
    ref, ref_lse = reference.decode(*args, return_lse=True)
    nan = torch.isnan(ref_lse)
    assert nan.any() == (window_left >= 0)  # the setup
    assert torch.equal(torch.isnan(lse), nan), "NaN lse rows differ from the reference's"
    assert_close(lse[~nan], ref_lse[~nan], 1e-4, 1e-4, what="lse")
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))


def test_decode_fp32_and_through_op():
    lens = [17, 0, 5]
    paged = random_paged(lens, 2, 32, 16, torch.float32)
    q = torch.randn(3, 4, 32)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    out = attn_ops.decode(q, paged.k_cache, paged.v_cache, seqlens, paged.block_table, 0.2,
                          backend="triton")
    ref = attn_ops.decode(q, paged.k_cache, paged.v_cache, seqlens, paged.block_table, 0.2,
                          backend="reference")
    assert_close(out, ref, *TOLERANCES[torch.float32])


def test_decode_split_count_is_static():
    # A pure function of (B, Hkv, capacity, SMs): lengths never enter.
    assert decode_plan.num_splits(1, 8, 32768, 132, 64) > 1
    assert decode_plan.num_splits(128, 8, 2048 * 16, 132, 64) == 1
    assert decode_plan.num_splits(1, 8, 64, 132, 64) == 1  # a tiny table: no split
    assert decode_plan.num_splits(0, 8, 1024, 132, 64) == 1
    assert decode_plan.num_splits(1, 1, 10 ** 7, 132, 64) == decode_plan._MAX_SPLITS
    # one sequence's heads: the most splits, down to 128 keys each (64 at 8k keys, where the
    # wave rule alone would stop at 32 of 256 keys); two sequences: the wave rule (25)
    assert decode_plan.num_splits(1, 8, 8192, 132, 64) == 64
    assert decode_plan.num_splits(1, 8, 4096, 132, 64) == 32
    assert decode_plan.num_splits(2, 8, 16384, 132, 64) == 25


def test_decode_deep_pipeline_plan(monkeypatch):
    # About one program per SM (0.95-1) at some split count of >= 512 keys: the wide row (and
    # for few sequences 0.9-1 at two splits or more of >= 128 keys: few_sequence_splits); else
    # 1.55-2 programs per SM at 1 or 2 splits (one sequence's heads: a power of two): the deep
    # row; for half-precision caches on a GPU only (never FP8, fp32, overrides, the interpreter).
    deep, wide, deep_row = decode_plan.deep_splits, decode_plan.WIDE_CONFIG, \
        decode_plan.DEEP_CONFIG
    assert deep(128, 132, 2048) == (1, wide) and deep(64, 132, 4096) == (2, wide)  # B 16, 8
    assert deep(32, 132, 8192) == (4, wide) and deep(32, 132, 1024) is None  # B 4
    assert deep(104, 132, 4096) == (2, deep_row) and deep(120, 132, 4096) == (2, deep_row)
    assert deep(8, 132, 32768) == (32, deep_row) and deep(8, 132, 8192) == (32, deep_row)
    assert deep(8, 132, 4096) is None  # one sequence: 32 splits of 128 keys are too short
    assert deep(256, 132, 2048) == (1, deep_row) and deep(224, 132, 2048) == (1, deep_row)
    assert deep(96, 132, 4096) is None  # B 12: 0.73 programs per SM, 1.45 at 2 splits
    assert deep(128, 132, 256) is None  # too short for a wide split or two deep ones
    assert deep(512, 132, 4096) is None and deep(160, 132, 4096) is None
    assert deep(200, 132, 8192) is None  # B 25: 1.52 programs per SM, slower on the H200
    # Few sequences: WIDE at one program per SM (0.9-1) from two splits of one 128-key tile up
    few = decode_plan.few_sequence_splits
    assert few(8, 132, 2048) == 16 and few(8, 132, 32768) == 16  # B 1
    assert few(8, 132, 1024) is None  # 8 splits of 128 keys: 0.48 per SM
    assert few(16, 132, 2048) == 8 and few(24, 132, 8192) == 5 and few(40, 132, 8192) == 3
    assert few(64, 132, 4096) == 2 and deep(64, 132, 4096) == (2, wide)  # the same row
    assert few(48, 132, 4096) is None  # B 6: 0.73 per SM at two splits
    assert few(128, 132, 2048) is None and few(120, 132, 4096) is None  # one split: deep's rule
    row = decode_plan.half_precision_row  # the plan's choice: few's, else deep's at any split
    assert row(8, 132, 8192) == (16, wide) and row(256, 132, 2048) == (1, deep_row)
    assert row(48, 132, 4096) == (5, deep_row) and deep(48, 132, 4096) is None  # B 6
    assert row(56, 132, 4096) == (4, deep_row) and row(88, 132, 8192) == (3, deep_row)
    assert row(48, 132, 1024) is None  # 5 splits would be shorter than 256 keys
    assert row(96, 132, 4096) is None  # B 12: 1.45 per SM at 2 splits, 2.2 at 3
    # the decode's WIDE unsplit from 0.75 per SM (B 13-15), where the few-query plans keep
    # DEEP at 2 splits; WIDE split in two stays at 0.95 (B 7: DEEP at 4)
    assert row(104, 132, 4096) == (1, wide) and row(120, 132, 2048) == (1, wide)
    assert deep(104, 132, 4096) == (2, deep_row) and row(56, 132, 4096) == (4, deep_row)
    assert row(104, 132, 256) is None  # shorter than a WIDE split
    monkeypatch.setattr(decode_kernel, "INTERPRET", False)
    monkeypatch.setattr(decode_plan, "INTERPRET", False)
    monkeypatch.setattr(decode_kernel, "device_sm_count", lambda device: 132)
    plan = decode_kernel._plan.__wrapped__

    def stage1(dtype=torch.bfloat16, cache=torch.bfloat16, batch=16, config=None, splits=None):
        got = plan(batch, 32, 8, 128, 16, 128, dtype, torch.device("cpu"), False, False, config,
                   splits, False, cache, True)
        return got[0], (got[4]["BLOCK_N"], got[4]["num_warps"], got[4]["num_stages"])
    assert stage1() == (1, (128, 4, 5)) and stage1(batch=32) == (1, (64, 4, 5))
    assert stage1(batch=13) == (1, (128, 4, 5))  # WIDE unsplit from 0.75 per SM
    assert stage1(batch=1) == (16, (128, 4, 5)) and stage1(batch=3) == (5, (128, 4, 5))
    assert stage1(torch.float16, torch.float16) == (1, (128, 4, 5))
    assert stage1(batch=64) == (1, (64, 4, 3))  # 512 programs: the wave rule's row
    assert stage1(cache=torch.float8_e4m3fn) == (2, (128, 4, 5))  # decode_plan.FP8_DEEP_CONFIG
    assert stage1(cache=torch.float8_e4m3fn, batch=64) == (1, (128, 4, 2))  # FP8_CONFIG's row
    assert stage1(torch.float32, torch.float32)[1] == (32, 4, 2)
    assert stage1(splits=4) == (4, (64, 4, 3))
    assert stage1(config=decode_plan.Config(64, 4, 3)) == (4, (64, 4, 3))
    # B 24: the default row counts the programs an SM holds (two splits, not the wave rule's
    # three); another row keeps the wave rule
    assert stage1(batch=24) == (2, (64, 4, 3))
    assert stage1(batch=24, config=decode_plan.Config(64, 4, 4)) == (3, (64, 4, 4))
    # the WIDE row's fused merge: no register cap (an lse build's merge is a call:
    # test_decode_sass.py)
    got = plan(8, 32, 8, 128, 16, 256, torch.bfloat16, torch.device("cpu"), False, False, None,
               None, True, torch.bfloat16, True)
    assert got[0] == 2 and got[4]["FUSED"] and got[4]["BLOCK_N"] == 128
    assert "maxnreg" not in got[4]


def test_decode_fp8_deep_plan(monkeypatch):
    # FP8 caches: the fewest of 1, 2, 4 splits that gives each SM 1.55-3 programs of >= 512 keys
    # each (FP8_DEEP_CONFIG: 168 registers, so three fit), else FP8_CONFIG's row; one sequence's
    # heads (<= 8 pairs) keep num_splits' rule.
    fp8 = decode_plan.fp8_deep_splits
    assert fp8(128, 132, 4096) == 2 and fp8(128, 132, 1024) == 2  # B 16: 1.94 per SM
    assert fp8(128, 132, 1023) is None  # two splits of fewer than 512 keys
    assert fp8(64, 132, 4096) == 4 and fp8(64, 132, 2047) is None  # B 8
    assert fp8(256, 132, 4096) == 1 and fp8(256, 132, 16) == 1  # B 32: one split, any length
    assert fp8(192, 132, 4096) == 2  # B 24: 1.45 per SM at one split, 2.9 at two
    assert fp8(392, 132, 4096) == 1 and fp8(400, 132, 4096) is None  # B 49 fits, B 50 not
    assert fp8(512, 132, 4096) is None  # B 64: 3.9 per SM, two waves
    assert fp8(200, 132, 4096) is None  # B 25: 1.52 at one split, 3.03 at two
    assert fp8(8, 132, 32768) is None and fp8(0, 132, 4096) is None
    monkeypatch.setattr(decode_kernel, "INTERPRET", False)
    monkeypatch.setattr(decode_plan, "INTERPRET", False)
    monkeypatch.setattr(decode_kernel, "device_sm_count", lambda device: 132)
    plan = decode_kernel._plan.__wrapped__

    def stage1(batch, width=256, config=None, splits=None):
        got = plan(batch, 32, 8, 128, 16, width, torch.bfloat16, torch.device("cpu"), False,
                   False, config, splits, True, torch.float8_e4m3fn, True, True)
        cfg = (got[4]["BLOCK_N"], got[4]["num_warps"], got[4]["num_stages"], got[4]["maxnreg"])
        return got[0], cfg, got[4]["FUSED"], got[1] is decode_kernel._decode_split_kernel
    deep, row = tuple(decode_plan.FP8_DEEP_CONFIG), tuple(decode_plan.FP8_CONFIG)
    assert stage1(16) == (2, deep, True, True)  # the split kernel, its merge fused
    assert stage1(32) == (1, deep, False, True) and stage1(8) == (4, deep, True, True)
    assert stage1(64)[:2] == (1, row) and stage1(16, width=32)[1] == row
    assert stage1(16, config=decode_plan.FP8_CONFIG)[:2] == (4, row)  # an override: wave rule
    assert stage1(16, splits=3)[:2] == (3, row)


def test_fused_merge_counters_reset_and_plan():
    # The default (FUSED_MERGE): up to 64 splits merged in the last split program (8 per trip
    # to L2, the trips unrolled); its counters
    # (one buffer per stream for eager calls, kept) are zero again after every call; a traced
    # call gets a fresh buffer.
    from attn_ops.backends.triton.split_counters import semaphores
    from torch._subclasses.fake_tensor import FakeTensorMode
    assert decode_kernel.FUSED_MERGE

    def fused(splits):
        return decode_kernel._plan(4, 4, 2, 32, 4, 10, torch.float32, torch.device("cpu"),
                                   False, False, None, splits, True, torch.float32, False)[4]
    assert fused(3)["FUSED"] and fused(3)["S_P2"] == 4 and fused(8)["S_P2"] == 8
    assert fused(9)["FUSED"] and (fused(9)["S_P2"], fused(9)["CHUNKS"]) == (8, 2)
    assert (fused(64)["S_P2"], fused(64)["CHUNKS"]) == (8, 8)
    assert not fused(65)["FUSED"] and not fused(1)["FUSED"] and fused(65)["S_P2"] == 1
    cpu = torch.device("cpu")
    buf = semaphores(8, cpu)
    lens = [40, 1, 0, 23]
    paged = random_paged(lens, 2, 32, 4, torch.float32)
    q = torch.randn(len(lens), 6, 32)
    args = (q, paged.k_cache, paged.v_cache, torch.tensor(lens, dtype=torch.int32),
            paged.block_table, 0.2)
    ref = reference.decode(*args)
    for splits in (3, 5):
        assert_close(decode_kernel.decode(*args, splits=splits, out=poisoned(q.shape, q.dtype),
                                          fused=True), ref, *TOLERANCES[torch.float32])
        assert semaphores(8, cpu) is buf and torch.count_nonzero(buf) == 0
    with FakeTensorMode():
        assert semaphores(8, cpu) is not buf


def test_split_partials_kept_per_stream_and_fresh_when_traced(monkeypatch):
    # The split partials (split_counters.partials): eager calls get views of one kept float32
    # buffer, the same objects for the same shapes (no allocation per call), the LSE rows after
    # the outputs' (no overlap, 256-byte aligned); a larger request grows the buffer at least
    # twofold and keeps the old one alive; a traced call gets fresh tensors. Then the split
    # decode, called twice in a row on the kept partials, still matches the reference.
    from attn_ops.backends.triton import split_counters
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setattr(split_counters, "_PARTIALS", {})
    monkeypatch.setattr(split_counters, "_RETIRED", [])
    monkeypatch.setattr(split_counters, "_PARTIALS_MIN", 1000)
    cpu = torch.device("cpu")
    o, lse = split_counters.partials((4, 6, 3, 32), (4, 6, 3), cpu)
    assert o.shape == (4, 6, 3, 32) and lse.shape == (4, 6, 3) and o.dtype == torch.float32
    assert split_counters.partials((4, 6, 3, 32), (4, 6, 3), cpu) == (o, lse)
    assert o.is_contiguous() and lse.is_contiguous()
    base = o.untyped_storage().data_ptr()
    assert lse.data_ptr() == base + 4 * 2304 and lse.untyped_storage().data_ptr() == base
    o2, lse2 = split_counters.partials((10, 32), (10,), cpu)  # another shape: the same buffer
    assert o2.data_ptr() == base and lse2.data_ptr() == base + 4 * 320
    big, _ = split_counters.partials((100, 32), (100,), cpu)  # past 2304 + 72: grown twofold
    assert big.untyped_storage().nbytes() == 4 * max(3200 + 100, 2 * 2376)
    assert big.untyped_storage().data_ptr() != base and len(split_counters._RETIRED) == 1
    with FakeTensorMode():
        fake = split_counters.partials((4, 6, 3, 32), (4, 6, 3), cpu)[0]
    assert fake is not o and len(split_counters._PARTIALS) == 1

    for lens in ([40, 1, 0, 23], [7, 33, 0, 2]):
        paged = random_paged(lens, 2, 32, 4, torch.float32)
        q = torch.randn(len(lens), 6, 32)
        args = (q, paged.k_cache, paged.v_cache, torch.tensor(lens, dtype=torch.int32),
                paged.block_table, 0.2)
        got = decode_kernel.decode(*args, splits=3, fused=False, out=poisoned(q.shape, q.dtype))
        assert_close(got, reference.decode(*args), *TOLERANCES[torch.float32])


@pytest.mark.parametrize("splits", [9, 16, 21])
def test_fused_merge_in_chunks(monkeypatch, splits):
    # Past MERGE_CHUNK splits the merging program loads the partials a chunk at a time into a
    # running merge (the last chunk partly masked at 9 and 21 splits; short sequences leave
    # many splits empty, whole chunks of them at 21); with sinks and the lse.
    from attn_ops.backends.triton.split_counters import semaphores
    monkeypatch.setattr(decode_kernel, "_FUSED_MAX_SPLITS", 64)
    lens = [400, 1, 0, 37]
    paged = random_paged(lens, 2, 32, 4, torch.float32)
    q = torch.randn(len(lens), 6, 32)
    sinks = torch.randn(6)
    args = (q, paged.k_cache, paged.v_cache, torch.tensor(lens, dtype=torch.int32),
            paged.block_table, 0.2)
    stage1 = decode_kernel._plan(4, 6, 2, 32, 4, paged.block_table.shape[1], torch.float32,
                                 torch.device("cpu"), False, False, None, splits, True,
                                 torch.float32, False)[4]
    assert stage1["FUSED"] and stage1["S_P2"] == decode_kernel.MERGE_CHUNK
    want, want_lse = reference.decode(*args, sinks=sinks, return_lse=True)
    got, lse = decode_kernel.decode(*args, sinks=sinks, return_lse=True, splits=splits,
                                    fused=True, out=poisoned(q.shape, q.dtype),
                                    lse=poisoned(want_lse.shape, torch.float32))
    assert_close(got, want, *TOLERANCES[torch.float32])
    assert_close(lse, want_lse, *TOLERANCES[torch.float32])
    assert torch.count_nonzero(semaphores(8, torch.device("cpu"))) == 0


@triton.jit
def _count_in_kernel(SEMA, LAST, mine, total):
    last = last_to_count_in(SEMA, 1, mine, total)
    tl.store(LAST, last.to(tl.int32))


@pytest.mark.parametrize("before, mine, total, last, after", [
    (0, 1, 3, 0, 1 + (1 << 16)),  # the first of three splits: arrives, then publishes
    ((1 << 16) + 1, 1, 3, 0, 2 + (2 << 16)),  # the second likewise
    ((2 << 16) + 2, 1, 3, 1, (2 << 16) + 3),  # the last: the two others published; no publish
    ((5 << 16) + 5, 3, 8, 1, (5 << 16) + 8),  # tiles: a piece of 3 completes 8
    (0, 8, 8, 1, 8),  # one piece holds them all
])
def test_count_in_fields(before, mine, total, last, after):
    # split_counters.last_to_count_in: arrivals in the low 16 bits, published partials in the high
    # 16. The program that completes the count publishes nothing and returns True (its own caller
    # resets the counter); any other adds ``mine`` to both fields. (The wait for a late publisher
    # needs concurrent programs: the GPU tests' merges exercise it.)
    sema = torch.tensor([-1, before, -1], dtype=torch.int32)
    got = torch.tensor([-7], dtype=torch.int32)
    _count_in_kernel[(1,)](sema, got, mine, total)
    assert got.item() == last and sema.tolist() == [-1, after, -1]


def test_capture_counters_are_handed_out_once():
    # A captured call's counters (split_counters._Slab): disjoint ranges of one zeroed buffer,
    # front to back, then None (the caller falls back to a fresh zeroed buffer).
    from attn_ops.backends.triton.split_counters import _Slab
    slab = _Slab(torch.zeros(10, dtype=torch.int32))
    a, b, c = slab.take(4), slab.take(6), slab.take(1)
    assert c is None and a.numel() == 4 and b.numel() == 6
    assert a.data_ptr() + 4 * 4 == b.data_ptr() == slab.buf.data_ptr() + 16
    assert slab.take(0) is not None and slab.used == 10


def _every_other_column(t):
    """The same values as ``t`` ``[B, W]``, as columns 0, 2, 4.. of a ``[B, 2W]`` tensor
    (column stride 2) whose other columns are garbage block ids."""
    wide = torch.full((t.shape[0], 2 * t.shape[1]), 10 ** 6, dtype=t.dtype)
    wide[:, ::2] = t
    return wide[:, ::2]


@pytest.mark.parametrize("table_layout", ["column_stride_2", "transposed"])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_strided_index_tensors(table_layout, splits):
    # Issue 12: strided seqlens_k / block_table were read as dense (wrong keys, heap reads).
    lens = [13, 0, 40, 1]
    paged = random_paged(lens, 2, 32, 16, torch.float16, table_width=4)
    q = torch.randn(4, 4, 32, dtype=torch.float16)
    seqlens = torch.tensor([[n, 999] for n in lens], dtype=torch.int32)[:, 0]  # stride 2
    table = paged.block_table
    table = _every_other_column(table) if table_layout == "column_stride_2" else table.t(
        ).contiguous().t()
    assert seqlens.stride(0) == 2 and not table.is_contiguous()
    out = poisoned(q.shape, q.dtype)
    decode_kernel.decode(q, paged.k_cache, paged.v_cache, seqlens, table, 0.2, splits=splits,
                         out=out)
    ref = reference.decode(q, paged.k_cache, paged.v_cache, seqlens.contiguous(),
                           paged.block_table, 0.2)
    assert_close(out, ref, *TOLERANCES[torch.float16], what="decode, strided indices")
    # and through the op, with its data checks on (they validate the logical values)
    got = attn_ops.decode(q, paged.k_cache, paged.v_cache, seqlens, table, 0.2, backend="triton")
    assert_close(got, ref, *TOLERANCES[torch.float16], what="decode op, strided indices")


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_transposed_dense_cache(splits):
    # A dense [B, Hkv, S, D] cache transposed is one block per sequence (block stride Hkv*S*D,
    # in-page stride D): the contract's example of a strided cache.
    b, hkv, s_max, d, h = 3, 2, 23, 32, 4
    k_dense = torch.randn(b, hkv, s_max, d, dtype=torch.bfloat16)
    v_dense = torch.randn_like(k_dense)
    k_cache, v_cache = k_dense.transpose(1, 2), v_dense.transpose(1, 2)  # [B, S, Hkv, D]
    table = torch.arange(b, dtype=torch.int32)[:, None]
    lens = torch.tensor([23, 0, 9], dtype=torch.int32)
    q = torch.randn(b, h, d, dtype=torch.bfloat16)
    out = poisoned(q.shape, q.dtype)
    decode_kernel.decode(q, k_cache, v_cache, lens, table, 0.3, splits=splits, out=out)
    ref = reference.decode(q, k_cache.contiguous(), v_cache.contiguous(), lens, table, 0.3)
    assert_close(out, ref, *TOLERANCES[torch.bfloat16], what="decode, transposed cache")


@pytest.mark.parametrize("balanced", [False, True])
def test_decode_kv_strides_apart(monkeypatch, balanced):
    # K and V offsets are computed once where both caches share their block and in-page strides
    # (KV_SAME_STRIDES); a V cache laid out otherwise (helpers.laid_apart: both strides
    # differ) is read at its own offsets. Both kernels.
    lens = [45, 0, 17, 30]
    paged = random_paged(lens, 2, 32, 8, torch.float32)
    k_cache, v_cache = paged.k_cache, laid_apart(paged.v_cache)
    q = torch.randn(len(lens), 4, 32)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    same = record_launches(monkeypatch, decode_kernel, "KV_SAME_STRIDES")
    for v, expected in ((v_cache, False), (paged.v_cache, True)):
        args = (q, k_cache, v, seqlens, paged.block_table, 0.2)
        ref = reference.decode(*args)
        for splits in (1, 3):
            out = poisoned(q.shape, torch.float32)
            decode_kernel.decode(*args, splits=splits, out=out, balanced=balanced)
            assert_close(out, ref, *TOLERANCES[torch.float32],
                         what=f"{splits} splits, V strides {v.stride()}")
            assert same[-1] is expected, same


def _fp8_paged(lens, hkv, d, block_size, pad, device="cpu", table_width=None):
    """FP8 paged caches and per-head scales; with ``pad`` the caches are views of wider rows,
    starting ``pad`` elements in (an odd address for pad 1, even strides for an even width)."""
    paged = random_paged(lens, hkv, d, block_size, torch.bfloat16, device=device,
                         table_width=table_width)
    k_scale = torch.rand(hkv, device=device) * 0.01 + 0.01
    v_scale = torch.rand(hkv, device=device) * 0.01 + 0.01
    caches = []
    for x, scale in ((paged.k_cache, k_scale), (paged.v_cache, v_scale)):
        x8 = reference.quantize_fp8(x, scale, torch.float8_e4m3fn)
        if pad:
            wide = torch.zeros((*x8.shape[:-1], d + 2), dtype=torch.float8_e4m3fn,
                               device=device)
            wide[..., pad:pad + d] = x8
            x8 = wide[..., pad:pad + d]
        caches.append(x8)
    return caches, k_scale, v_scale, paged.block_table


@pytest.mark.parametrize("q_dtype,d,pad", [(torch.bfloat16, 32, 0), (torch.float16, 40, 0),
                                            (torch.bfloat16, 32, 1), (torch.float16, 32, 2)])
def test_decode_fp8_pairs(monkeypatch, q_dtype, d, pad):
    # FP8 caches read as int16 pairs (even and odd columns, two dots) where the caches allow,
    # else the one-tile path: an odd start address (pad 1) must not take the int16 reads.
    lens = [37, 0, 5]
    (k8, v8), k_scale, v_scale, table = _fp8_paged(lens, 2, d, 16, pad)
    q = torch.randn(len(lens), 4, d, dtype=q_dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    args = (q, k8, v8, seqlens, table, d ** -0.5)
    ref = reference.decode(*args, k_scale=k_scale, v_scale=v_scale)
    taken = record_launches(monkeypatch, decode_kernel, "FP8_PAIRS")
    for splits in (1, 2):
        out = poisoned(q.shape, q_dtype)
        decode_kernel.decode(*args, k_scale=k_scale, v_scale=v_scale, splits=splits, out=out)
        assert_close(out, ref, *TOLERANCES[q_dtype], what=f"fp8 decode, {splits} splits")
    assert taken[0] is (pad != 1), taken
    # the per-signature function: planned with int16 reads, checks the address per call
    bound = decode_kernel.bind_decode(*args, k_scale=k_scale, v_scale=v_scale)
    assert_close(bound(*args, k_scale=k_scale, v_scale=v_scale), ref, *TOLERANCES[q_dtype],
                 what="fp8 decode, bound")
    if pad == 2:  # the same signature (strides) at an odd address: the wrapper, one tile
        (k_odd, v_odd), *_ = _fp8_paged(lens, 2, d, 16, 1)
        k_odd.copy_(k8)
        v_odd.copy_(v8)
        assert k_odd.stride() == k8.stride() and k_odd.data_ptr() % 2 == 1
        taken.clear()
        got = bound(q, k_odd, v_odd, seqlens, table, d ** -0.5, k_scale=k_scale,
                    v_scale=v_scale)
        assert taken[0] is False, taken  # stage 1 without the int16 reads
        assert_close(got, ref, *TOLERANCES[q_dtype], what="fp8 decode, bound, odd address")


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------

def _decode_case(lens, h, hkv, d, block_size, dtype, window_left=-1, softcap=0.0, splits=None,
                 table_width=None, fused=None):
    paged = random_paged(lens, hkv, d, block_size, dtype, device=DEV, table_width=table_width)
    q = torch.randn(len(lens), h, d, dtype=dtype, device=DEV)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    args = (q, paged.k_cache, paged.v_cache, seqlens, paged.block_table, d ** -0.5, window_left,
            softcap)
    out = decode_kernel.decode(*args, splits=splits, out=_nan(q.shape, dtype), fused=fused)
    ref = reference.decode(*args)
    assert_close(out, ref, *TOLERANCES[dtype], what="decode")
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_decode_block_sizes_cuda(block_size, dtype):
    out = _decode_case([1000, 0, 1, 333, 4096], 32, 8, 128, block_size, dtype)
    assert torch.all(out[1] == 0)


@pytest.mark.cuda
@pytest.mark.parametrize("d", [64, 96, 256, 40])
@pytest.mark.parametrize("h,hkv", [(8, 8), (32, 4), (32, 1)])
def test_decode_head_dims_groups_cuda(d, h, hkv):
    _decode_case([517, 1, 0, 64], h, hkv, d, 16, BF16)


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("splits", [1, 2, 7, 64])
@pytest.mark.parametrize("window_left,softcap", [(-1, 0.0), (300, 0.0), (-1, 50.0), (0, 0.0)])
def test_decode_splits_window_softcap_cuda(splits, window_left, softcap, fused):
    _decode_case([2000, 5, 0, 900], 16, 4, 128, 64, FP16, window_left, softcap, splits=splits,
                 fused=fused)


@pytest.mark.cuda
def test_decode_fused_merge_repeats_cuda():
    # the semaphores reset themselves: many calls in a row, each checked, none stale
    for _ in range(20):
        _decode_case([3000, 1, 0, 777], 32, 8, 128, 16, BF16, splits=7, fused=True)


@pytest.mark.cuda
def test_decode_long_single_sequence_and_fp32_cuda():
    _decode_case([32768], 32, 8, 128, 256, BF16)
    _decode_case([3000, 0], 8, 2, 64, 16, torch.float32, table_width=256)


@pytest.mark.cuda
def test_decode_int64_block_table_cuda():
    paged = random_paged([300, 45], 2, 64, 16, BF16, device=DEV)
    q = torch.randn(2, 4, 64, dtype=BF16, device=DEV)
    seqlens = torch.tensor([300, 45], dtype=torch.int32, device=DEV)
    table = paged.block_table.long()
    out = decode_kernel.decode(q, paged.k_cache, paged.v_cache, seqlens, table, 0.125)
    ref = reference.decode(q, paged.k_cache, paged.v_cache, seqlens, table, 0.125)
    assert_close(out, ref, *TOLERANCES[BF16])



@pytest.mark.cuda
@pytest.mark.parametrize("d,pad", [(64, 0), (96, 2), (128, 1), (128, 0)])
@pytest.mark.parametrize("q_dtype", HALF)
def test_decode_fp8_pairs_cuda(q_dtype, d, pad):
    # the int16 pair reads compiled (inline conversion), and the odd-address fallback
    lens = [3000, 0, 1, 777]
    (k8, v8), k_scale, v_scale, table = _fp8_paged(lens, 8, d, 16, pad, DEV)
    q = torch.randn(len(lens), 32, d, dtype=q_dtype, device=DEV)
    args = (q, k8, v8, torch.tensor(lens, dtype=torch.int32, device=DEV), table, d ** -0.5)
    ref = reference.decode(*args, k_scale=k_scale, v_scale=v_scale)
    for splits in (None, 1):
        out = decode_kernel.decode(*args, k_scale=k_scale, v_scale=v_scale, splits=splits,
                                   out=_nan(q.shape, q_dtype))
        assert_close(out, ref, *TOLERANCES[q_dtype], what=f"fp8 decode, {splits} splits")


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [8, 16, 32, 64])
@pytest.mark.parametrize("extras", [False, True])
def test_decode_fp8_deep_rows_cuda(monkeypatch, batch, extras):
    # FP8 caches at 1.55-3 programs per SM (decode_plan.FP8_DEEP_CONFIG: on a 132-SM GPU at 8 kv
    # heads, B 8 takes 4 splits, B 16 two, B 32 one; B 64 FP8_CONFIG's row), lengths from 0 to
    # the table's 2048 keys; with sinks and the lse through the fused merge
    from attn_ops.backends.triton.common import device_sm_count
    gen = torch.Generator().manual_seed(batch)
    lens = torch.randint(0, 2049, (batch,), generator=gen)
    lens[:3] = torch.tensor([0, 1, 2048])
    lens = lens.tolist()
    (k8, v8), k_scale, v_scale, table = _fp8_paged(lens, 8, 128, 16, 0, DEV, table_width=128)
    q = torch.randn(batch, 32, 128, dtype=BF16, device=DEV)
    args = (q, k8, v8, torch.tensor(lens, dtype=torch.int32, device=DEV), table, 128 ** -0.5)
    sinks = torch.randn(32, device=DEV) if extras else None
    kw = dict(sinks=sinks, k_scale=k_scale, v_scale=v_scale)
    ref_out, ref_lse = reference.decode(*args, -1, 0.0, **kw, return_lse=True)
    stages = record_launches(monkeypatch, decode_kernel, "num_stages")
    got = decode_kernel.decode(*args, **kw, return_lse=extras, out=_nan(q.shape, BF16),
                               lse=_nan((batch, 32), torch.float32) if extras else None)
    out, lse = got if extras else (got, None)
    assert_close(out, ref_out, *TOLERANCES[BF16], what=f"fp8 decode, B {batch}")
    if extras:
        assert_close(lse, ref_lse, 1e-3, 1e-3, what=f"fp8 decode lse, B {batch}")
    deep = decode_plan.fp8_deep_splits(batch * 8, device_sm_count(q.device), 2048)
    assert (stages[0] == decode_plan.FP8_DEEP_CONFIG.stages) == (deep is not None), stages
    assert torch.all(out[0] == 0)
