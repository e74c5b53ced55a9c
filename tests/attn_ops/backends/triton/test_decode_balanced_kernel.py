"""The balanced one-token decode kernel (decode_balanced_kernel.py): the batch's key tiles dealt
out evenly over the programs, pieces of a (sequence, kv head) merged by the one that completes
it. The interpreter at tiny shapes (CI) and, marked ``cuda``, compiled on a GPU; against the
reference backend with NaN-poisoned outputs and lse, and the split kernel's plan."""

from __future__ import annotations

import pytest
import torch

from attn_ops.backends import reference
from tests.support.helpers import (TOLERANCES, assert_close, poisoned, random_paged,
                                   record_launches)

triton = pytest.importorskip("triton")
from attn_ops.backends.triton import decode_kernel, decode_plan, split_counters  # noqa: E402
from attn_ops.backends.triton.split_counters import semaphores  # noqa: E402
from attn_ops.backends.triton.decode_balanced_kernel import decode_balanced_kernel  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def _case(lens, h, hkv, d, block_size, dtype, splits, device="cpu", window_left=-1,
          softcap=0.0, with_sinks=False, table_width=None, config=None, programs=None):
    """Balanced decode vs the reference, outputs and lse poisoned; returns (out, lse, ref)."""
    paged = random_paged(lens, hkv, d, block_size, dtype, device=device,
                         table_width=table_width)
    q = torch.randn(len(lens), h, d, dtype=dtype, device=device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    sinks = torch.randn(h, device=device) if with_sinks else None
    args = (q, paged.k_cache, paged.v_cache, seqlens, paged.block_table, d ** -0.5, window_left,
            softcap)
    out = poisoned(q.shape, dtype, device)
    lse = poisoned(q.shape[:2], FP32, device)
    decode_kernel.decode(*args, sinks=sinks, return_lse=True, splits=splits, out=out, lse=lse,
                         balanced=True, config=config, programs=programs)
    ref, ref_lse = reference.decode(*args, sinks=sinks, return_lse=True)
    assert_close(out, ref, *TOLERANCES[dtype], what="balanced decode")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert_close(lse[finite], ref_lse[finite], 1e-3, 1e-3, what="balanced decode lse")
    return out, lse, ref


# ---------------------------------------------------------------------------------------------
# interpreter
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lens,splits", [
    ([13, 0, 40, 1], 1),        # a 3-tile sequence among short ones: pieces cross pairs
    ([13, 0, 40, 1], 3),        # more programs than tiles: programs that hold nothing
    ([200, 3, 0, 17, 1], 2),    # one long sequence split over many programs
    ([0, 0, 0], 2),             # nothing to see: zeros, lse -inf
    ([5, 70], 1),               # two programs per kv head, unequal
])
def test_balanced_matches_reference(lens, splits):
    out, lse, _ = _case(lens, 8, 2, 32, 16, BF16, splits)
    for b, n in enumerate(lens):
        if n == 0:
            assert torch.all(out[b] == 0) and torch.all(lse[b] == float("-inf"))
    assert torch.count_nonzero(semaphores(len(lens) * 2, torch.device("cpu"))) == 0


@pytest.mark.parametrize("programs", [1, 5, 11, 40])
def test_balanced_any_program_count(monkeypatch, programs):
    # Tiles, not pairs, are dealt: a program count that is no multiple of the (sequence, kv
    # head) pairs (8 here) splits pairs anywhere, and more programs than tiles leave some empty
    launched = record_launches(monkeypatch, decode_kernel, "B_P2")
    grids = []
    launch = decode_kernel.launch
    monkeypatch.setattr(decode_kernel, "launch", lambda kernel, grid, *a, **k: (
        grids.append(grid), launch(kernel, grid, *a, **k))[1])
    out, lse, _ = _case([13, 0, 40, 1], 8, 2, 32, 16, BF16, 1, with_sinks=True,
                        programs=programs)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    assert grids == [(programs,)] and launched == [4], (grids, launched)
    assert torch.count_nonzero(semaphores(8, torch.device("cpu"))) == 0


@pytest.mark.parametrize("splits", [1, 3])
def test_balanced_zeros_first_at_the_wide_row(monkeypatch, splits):
    # The WIDE row zeroes the sequences with no key before its walk (ZEROS_FIRST; the other rows
    # after it): the same zeros and -inf lse, every other row untouched
    flags = record_launches(monkeypatch, decode_kernel, "ZEROS_FIRST")
    lens = [0, 13, 0, 140, 1, 0]
    for config in (decode_plan.WIDE_CONFIG, decode_plan.DEEP_CONFIG):
        out, lse, _ = _case(lens, 8, 2, 32, 16, BF16, splits, config=config, with_sinks=True)
        for b in (0, 2, 5):
            assert torch.all(out[b] == 0) and torch.all(lse[b] == float("-inf"))
    assert flags == [True, False], flags


@pytest.mark.parametrize("h,hkv,d,dtype", [(4, 4, 32, FP16), (6, 2, 40, FP32),
                                           (8, 1, 32, BF16)])
@pytest.mark.parametrize("window_left,softcap,sinks", [(-1, 0.0, True), (20, 0.0, False),
                                                       (-1, 3.0, False), (0, 0.0, True)])
def test_balanced_groups_window_softcap_sinks(h, hkv, d, dtype, window_left, softcap, sinks):
    # GQA groups 1, 3 (not a power of two) and 8; the window moves each sequence's first key,
    # so its tile count; a sink joins a merged pair's denominator once
    _case([90, 0, 7, 33], h, hkv, d, 16, dtype, 2, window_left=window_left, softcap=softcap,
          with_sinks=sinks)


def test_balanced_fp8_caches():
    # FP8 caches through the shared key walk (int16 pairs), pieces merged with their scale
    lens, hkv, d = [61, 2, 0, 30], 2, 32
    paged = random_paged(lens, hkv, d, 16, BF16)
    k_scale, v_scale = torch.rand(hkv) * 0.01 + 0.01, torch.tensor(0.02)
    k8 = reference.quantize_fp8(paged.k_cache, k_scale, torch.float8_e4m3fn)
    v8 = reference.quantize_fp8(paged.v_cache, v_scale, torch.float8_e4m3fn)
    q = torch.randn(len(lens), 8, d, dtype=BF16)
    args = (q, k8, v8, torch.tensor(lens, dtype=torch.int32), paged.block_table, d ** -0.5)
    out = poisoned(q.shape, BF16)
    decode_kernel.decode(*args, k_scale=k_scale, v_scale=v_scale, splits=2, out=out,
                         balanced=True)
    ref = reference.decode(*args, k_scale=k_scale, v_scale=v_scale)
    assert_close(out, ref, *TOLERANCES[BF16], what="balanced fp8 decode")


def test_balanced_nan_stays_in_its_pair():
    # A NaN value (column 5) in the long sequence's kv head 0: that column of its rows is NaN
    # (they see it), through the merge of that pair's pieces; everything else is exact, head 1
    # of the same sequence too, whose pieces sit in the same programs.
    lens = [150, 9, 31]
    paged = random_paged(lens, 2, 32, 16, FP32)
    block = int(paged.block_table[0, 4])
    paged.v_cache[block, 3, 0, 5] = float("nan")
    q = torch.randn(len(lens), 4, 32)
    args = (q, paged.k_cache, paged.v_cache, torch.tensor(lens, dtype=torch.int32),
            paged.block_table, 0.2)
    out = decode_kernel.decode(*args, splits=1, out=poisoned(q.shape, FP32), balanced=True)
    ref = reference.decode(*args)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out[0, :2, 5]).all() and int(torch.isnan(out).sum()) == 2
    keep = ~torch.isnan(ref)
    assert_close(out[keep], ref[keep], *TOLERANCES[FP32], what="pairs without the NaN")


def test_balanced_bound_call_equals_the_wrapper(monkeypatch):
    # The per-signature function launches the balanced kernel when the plan picks it (on the
    # GPU: the WIDE and DEEP rows; forced here), with its partials and counters.
    monkeypatch.setattr(decode_kernel, "balanced_default", lambda config, splits: True)
    decode_kernel._plan.cache_clear()
    try:
        lens = [70, 3, 0, 22]
        paged = random_paged(lens, 2, 32, 16, FP32)
        q = torch.randn(len(lens), 4, 32)
        args = (q, paged.k_cache, paged.v_cache, torch.tensor(lens, dtype=torch.int32),
                paged.block_table, 0.2)
        prepared = []
        prepare = decode_kernel.prepare
        monkeypatch.setattr(decode_kernel, "prepare", lambda kernel, *a, **kw: prepared.append(
            kernel) or prepare(kernel, *a, **kw))
        run = decode_kernel.bind_decode(*args, return_lse=True)
        assert prepared[0] is decode_kernel.decode_balanced_kernel, prepared
        launched = []
        launch = decode_kernel.launch
        monkeypatch.setattr(decode_kernel, "launch",
                            lambda kernel, *a, **kw: launched.append(kernel) or launch(
                                kernel, *a, **kw))
        ref, ref_lse = decode_kernel.decode(*args, return_lse=True, balanced=False)
        assert launched == [decode_kernel._decode_split_kernel]
        for _ in range(2):
            out, lse = run(*args, return_lse=True)
            assert_close(out, ref, 1e-5, 1e-5, what="bound balanced decode")
            assert_close(lse, ref_lse, 1e-5, 1e-5, what="its lse (-inf where no key)")
            assert torch.isneginf(lse[2]).all()  # the empty sequence
    finally:
        decode_kernel._plan.cache_clear()


def test_balanced_plan_rule(monkeypatch):
    # Default where the split plan's row is WIDE or DEEP at one split (one or two programs per
    # SM: its registers cost no residency); never for one sequence, past the batch cap, or a
    # tile count past int32; forced (balanced=True) wherever it can run.
    wide, deep, default = decode_plan.WIDE_CONFIG, decode_plan.DEEP_CONFIG, \
        decode_plan.DEFAULT_CONFIG
    assert decode_plan.balanced_default(wide, 1) and decode_plan.balanced_default(deep, 1)
    assert not decode_plan.balanced_default(wide, 2) and not decode_plan.balanced_default(
        default, 1) and not decode_plan.balanced_default(decode_plan.FP8_CONFIG, 1)
    applies = decode_plan.balanced_applies
    assert applies(2, 8, 4096, wide) and applies(1024, 8, 4096, wide)
    assert not applies(1, 8, 4096, wide) and not applies(1025, 8, 4096, wide)
    tiny = decode_plan.Config(16, 4, 1)
    assert applies(1024, 64, 2 ** 18, tiny) and not applies(1024, 128, 2 ** 18, tiny)  # 2^31
    # A pair's tiles must fit the merge counter's 16-bit fields (split_counters)
    limit = split_counters.COUNT_LIMIT
    assert applies(2, 8, (limit - 1) * 128, wide) and not applies(2, 8, limit * 128, wide)
    monkeypatch.setattr(decode_kernel, "INTERPRET", False)
    monkeypatch.setattr(decode_plan, "INTERPRET", False)
    monkeypatch.setattr(decode_kernel, "device_sm_count", lambda device: 132)
    plan = decode_kernel._plan.__wrapped__

    def kernel(batch, width=128, balanced=None, cache=BF16):
        got = plan(batch, 32, 8, 128, 16, width, BF16, torch.device("cpu"), False, False, None,
                   None, True, cache, True, False, balanced)
        return got[1], got[2]
    assert kernel(16) == (decode_balanced_kernel, (128,))  # WIDE, one split
    assert kernel(32)[0] is decode_balanced_kernel  # DEEP, one split
    assert kernel(64)[0] is decode_kernel._decode_split_kernel  # the default row
    assert kernel(8, width=256)[0] is decode_kernel._decode_split_kernel  # WIDE, two splits
    assert kernel(16, cache=torch.float8_e4m3fn)[0] is decode_kernel._decode_split_kernel
    assert kernel(16, balanced=False)[0] is decode_kernel._decode_split_kernel
    assert kernel(64, balanced=True) == (decode_balanced_kernel, (512,))
    assert kernel(1, balanced=True)[0] is decode_kernel._decode_split_kernel  # nothing to share


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------

SKEWED = [[16384] + [1024] * 15, [8192, 8192] + [512] * 14, [3000, 0, 1, 17, 4095, 64] * 5]


@pytest.mark.cuda
@pytest.mark.parametrize("lens", SKEWED, ids=["one_long", "two_long", "mixed"])
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("block_size", [16, 64])
def test_balanced_skewed_batches_cuda(lens, dtype, block_size):
    # The default plan at these batches (B 16: WIDE at one split; B 30: DEEP) takes the
    # balanced kernel; pieces of the long sequences merge across many programs.
    out, _, _ = _case(lens, 32, 8, 128, block_size, dtype, None, device="cuda")
    assert torch.count_nonzero(semaphores(len(lens) * 8, out.device)) == 0


@pytest.mark.cuda
@pytest.mark.parametrize("config,splits", [(None, 3), ((64, 4, 3), None), ((128, 4, 5), 1)])
@pytest.mark.parametrize("window_left,softcap,sinks", [(-1, 0.0, True), (700, 0.0, False),
                                                       (-1, 30.0, True)])
def test_balanced_configs_window_softcap_sinks_cuda(config, splits, window_left, softcap,
                                                    sinks):
    _case([9000, 13, 0, 4096, 1, 700], 32, 8, 128, 16, BF16, splits, device="cuda",
          window_left=window_left, softcap=softcap, with_sinks=sinks, config=config)


@pytest.mark.cuda
@pytest.mark.parametrize("h,hkv,d", [(32, 4, 64), (8, 8, 128), (32, 1, 96)])
def test_balanced_heads_and_dims_cuda(h, hkv, d):
    _case([5000, 77, 0, 2049, 31], h, hkv, d, 32, FP16, None, device="cuda")


@pytest.mark.cuda
def test_balanced_fp8_cuda():
    lens, hkv, d = [9000, 13, 0, 4096, 1, 700], 8, 128
    paged = random_paged(lens, hkv, d, 16, BF16, device="cuda")
    k_scale = torch.rand(hkv, device="cuda") * 0.01 + 0.01
    v_scale = torch.tensor(0.02, device="cuda")
    k8 = reference.quantize_fp8(paged.k_cache, k_scale, torch.float8_e4m3fn)
    v8 = reference.quantize_fp8(paged.v_cache, v_scale, torch.float8_e4m3fn)
    q = torch.randn(len(lens), 32, d, dtype=BF16, device="cuda")
    args = (q, k8, v8, torch.tensor(lens, dtype=torch.int32, device="cuda"), paged.block_table,
            d ** -0.5)
    out = decode_kernel.decode(*args, k_scale=k_scale, v_scale=v_scale, balanced=True,
                               out=poisoned(q.shape, BF16, "cuda"))
    ref = reference.decode(*args, k_scale=k_scale, v_scale=v_scale)
    assert_close(out, ref, *TOLERANCES[BF16], what="balanced fp8 decode")


@pytest.mark.cuda
def test_balanced_under_cuda_graph_replays():
    # Captured: the counters are the capture's own; replays with new lengths (on the device)
    # rebalance without a recapture and leave the counters zero.
    paged = random_paged([4096] * 16, 8, 128, 16, BF16, device="cuda")  # every row mapped
    q = torch.randn(16, 32, 128, dtype=BF16, device="cuda")
    seqlens = torch.tensor([4096] + [256] * 15, dtype=torch.int32, device="cuda")
    args = (q, paged.k_cache, paged.v_cache, seqlens, paged.block_table, 128 ** -0.5)
    assert decode_kernel._plan(16, 32, 8, 128, 16, paged.block_table.shape[1], BF16, q.device,
                               False, False, None, None, True, BF16, False)[1] \
        is decode_balanced_kernel
    decode_kernel.decode(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_kernel.decode(*args)
    for new in ([4096] + [256] * 15, [17] * 15 + [4096], [0] * 8 + [300] * 8):
        seqlens.copy_(torch.tensor(new, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        assert_close(out, reference.decode(*args), *TOLERANCES[BF16], what=f"replay {new[:2]}")
