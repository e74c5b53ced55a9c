"""The balanced kernel's few-query mode (decode_balanced_kernel.py, ``QUERIES``): a paged prefill
of a few queries per sequence (speculative verification, decode rows) whose key tiles are dealt
out evenly over the programs, the keys only some rows see taken by the piece with a pair's last
tile. The interpreter at tiny shapes (CI) and, marked ``cuda``, compiled on a GPU; against the
reference backend with NaN-poisoned outputs and lse, and the unified kernel's plan."""

from __future__ import annotations

import inspect

import pytest
import torch

from attn_ops.backends import reference
from tests.support.helpers import (TOLERANCES, assert_close, cu_seqlens, poisoned,
                                   random_paged)

triton = pytest.importorskip("triton")
from attn_ops.backends.triton import decode_plan, unified_kernel, unified_plan  # noqa: E402
from attn_ops.backends.triton.split_counters import semaphores  # noqa: E402
from attn_ops.backends.triton.decode_balanced_kernel import decode_balanced_kernel  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def _case(lens_q, lens_k, h, hkv, d, dtype=FP16, causal=True, softcap=0.0, with_sinks=False,
          extra_rows=0, block_size=16, device="cpu", fp8=False, balanced=True):
    """One few-query paged prefill vs the reference, outputs and lse poisoned; returns the
    output and lse."""
    paged = random_paged(lens_k, hkv, d, block_size, dtype, device=device)
    k, v, table = paged.k_cache, paged.v_cache, paged.block_table
    scales = {}
    if fp8:
        scales = dict(k_scale=torch.rand(hkv, device=device) * 0.01 + 0.01,
                      v_scale=torch.tensor(0.02, device=device))
        k = reference.quantize_fp8(k, scales["k_scale"], torch.float8_e4m3fn)
        v = reference.quantize_fp8(v, scales["v_scale"], torch.float8_e4m3fn)
    q = torch.randn(sum(lens_q) + extra_rows, h, d, dtype=dtype, device=device)
    sinks = torch.randn(h, device=device) if with_sinks else None
    args = (q, k, v, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device), max(lens_q),
            max(lens_k), d ** -0.5, causal, table, -1, softcap)
    out = poisoned(q.shape, dtype, device)
    lse = poisoned(q.shape[:2], FP32, device)
    unified_kernel.prefill(*args, sinks=sinks, return_lse=True, out=out, lse=lse,
                           balanced=balanced, **scales)
    ref, ref_lse = reference.prefill(*args, sinks=sinks, return_lse=True, **scales)
    assert_close(out, ref, *TOLERANCES[dtype], what="balanced few-query prefill")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert_close(lse[finite], ref_lse[finite], 1e-3, 1e-3, what="balanced few-query lse")
    if extra_rows:  # rows no sequence owns
        assert torch.all(out[-extra_rows:] == 0)
        assert torch.all(lse[-extra_rows:] == float("-inf"))
    return out, lse


# ---------------------------------------------------------------------------------------------
# interpreter (16-key tiles; one program per (sequence, kv head))
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lens_q,lens_k", [
    ([4, 4, 1, 3], [300, 2, 17, 64]),   # a long pair in pieces over many programs; lk < lq
    ([1, 4, 0, 2, 0], [13, 40, 0, 3, 7]),  # empty and query-less sequences
    ([2, 2, 2], [5, 3, 2]),             # more programs than tiles: programs that hold nothing
    ([3, 1], [0, 0]),                   # nothing to see: zeros, lse -inf
])
@pytest.mark.parametrize("causal", [True, False])
def test_few_query_balanced_matches_reference(lens_q, lens_k, causal):
    out, lse = _case(lens_q, lens_k, 4, 2, 32, causal=causal, extra_rows=2)
    start = 0
    for n_q, n_k in zip(lens_q, lens_k):
        if n_k == 0:
            assert torch.all(out[start:start + n_q] == 0)
        start += n_q
    assert torch.count_nonzero(semaphores(len(lens_q) * 2, torch.device("cpu"))) == 0


@pytest.mark.parametrize("h,hkv,lens_q", [(6, 2, [2, 5, 1]), (2, 2, [8, 3, 16]),
                                           (8, 1, [4, 2, 1])])
def test_few_query_balanced_groups(h, hkv, lens_q):
    # G = 3 (rows not a power of two), 1 (up to 16 queries in a tile), 8 (32 rows)
    _case(lens_q, [250, 9, 90], h, hkv, 32, dtype=BF16)


@pytest.mark.parametrize("softcap,sinks", [(0.0, True), (3.0, False), (2.0, True)])
def test_few_query_balanced_softcap_sinks(softcap, sinks):
    _case([4, 1, 3], [200, 31, 6], 4, 2, 32, softcap=softcap, with_sinks=sinks)


def test_few_query_balanced_fp8_cache():
    _case([4, 1, 3, 2], [200, 31, 6, 1], 4, 2, 32, dtype=BF16, fp8=True)


def test_few_query_balanced_isolates_a_non_finite_value():
    # A NaN value at the first speculative query's own key: the rows of the query before it
    # (which must not see it) stay finite and right, the rows that see it are NaN; a NaN
    # value in another sequence stays there.
    lens_q, lens_k, h, hkv, d = [4, 2], [150, 40], 4, 2, 32
    paged = random_paged(lens_k, hkv, d, 16, FP16)
    nan_pos = lens_k[0] - lens_q[0] + 1  # seen by queries 1.. of sequence 0, not by query 0
    block, offset = paged.block_table[0, nan_pos // 16], nan_pos % 16
    paged.v_cache[block, offset, 1] = float("nan")
    q = torch.randn(sum(lens_q), h, d, dtype=FP16)
    args = (q, paged.k_cache, paged.v_cache, cu_seqlens(lens_q), cu_seqlens(lens_k),
            max(lens_q), max(lens_k), d ** -0.5, True, paged.block_table)
    out = unified_kernel.prefill(*args, out=poisoned(q.shape, FP16, "cpu"), balanced=True)
    ref = reference.prefill(*args)
    heads = slice(2, 4)  # kv head 1's query heads
    assert torch.all(torch.isnan(out[1:4, heads]))
    assert_close(out[0], ref[0], *TOLERANCES[FP16], what="the row before the NaN key")
    assert_close(out[:, :2], ref[:, :2], *TOLERANCES[FP16], what="the other kv head")
    assert_close(out[4:], ref[4:], *TOLERANCES[FP16], what="the other sequence")


def test_balanced_plan_rule(monkeypatch):
    # The default takes it where the plan's row is a deep one at one split (B 16 x 8 kv heads
    # on 132 SMs: WIDE), up to 16 packed rows, paged, no window; forcing takes it up to 32.
    monkeypatch.setattr(unified_plan, "INTERPRET", False)
    monkeypatch.setattr(unified_plan, "device_sm_count", lambda device: 132)
    unified_plan.balanced_plan.cache_clear()
    try:
        def plan(b, max_q, force=None, window=False, paged=True, dtype=BF16, h=32, fp8=False):
            return unified_plan.balanced_plan(b, h, 8, 128, max_q, 8192, dtype,
                                              torch.device("cpu"), True, paged, window, fp8,
                                              force)
        grid, consts = plan(16, 4)
        assert grid == (128,) and consts["QUERIES"] and consts["G_P2"] == 16
        # every constexpr given, the launch's own (PAGE, SOFTCAP, common.extras' flags,
        # KV_SAME_STRIDES) beside the plan's: Inductor's launch of a traced call (wrap_triton)
        # takes no defaults
        given = set(consts) | {"PAGE", "SOFTCAP", "HAS_SINKS", "FP8", "WITH_LSE",
                               "KV_SAME_STRIDES"}
        params = inspect.signature(decode_balanced_kernel.fn).parameters  # jit or interpreted
        wanted = {name for name, p in params.items() if "constexpr" in str(p.annotation)}
        assert "QUERIES" in wanted and "ZEROS_FIRST" in wanted
        assert wanted <= given, sorted(wanted - given)
        assert consts["BLOCK_N"] == decode_plan.WIDE_CONFIG.block_n and consts["num_warps"] == 8
        deep = plan(32, 4)[1]  # DEEP, one split
        assert deep["BLOCK_N"] == decode_plan.DEEP_CONFIG.block_n and deep["num_warps"] == 4
        splits = decode_plan.num_splits(64, 8, 8192, 132, 64, decode_plan.DEFAULT_RESIDENT)
        assert plan(64, 4, force=True)[0] == (splits * 64 * 8,)  # the decode plan's programs
        assert plan(64, 4) is None  # the default row (4 programs per SM)
        assert plan(16, 8) is None  # 32 rows: the unified kernel by default
        assert plan(16, 8, force=True)[1]["G_P2"] == 32
        assert plan(16, 9, force=True) is None  # past 32 rows
        assert plan(16, 4, window=True) is None and plan(16, 4, paged=False) is None
        assert plan(16, 4, force=False) is None and plan(16, 4, dtype=FP32) is None
        assert plan(16, 4, fp8=True) is None and plan(16, 4, fp8=True, force=True) is not None
        assert plan(1, 4, force=True) is None  # one sequence: nothing to balance
    finally:
        unified_plan.balanced_plan.cache_clear()


def test_bound_call_takes_the_balanced_kernel(monkeypatch):
    # bind_prefill (the Triton backend's per-signature launch) with the plan's choice forced
    from attn_ops.backends.triton import unified_launch
    from attn_ops.backends.triton.launch import stats
    original = unified_plan.balanced_plan
    monkeypatch.setattr(unified_plan, "balanced_plan",
                        lambda *a: original(*a[:-1], True if a[-1] is None else a[-1]))
    lens_q, lens_k, h, hkv, d = [4, 1, 3], [120, 7, 33], 4, 2, 32
    paged = random_paged(lens_k, hkv, d, 16, FP16)
    q = torch.randn(sum(lens_q), h, d, dtype=FP16)
    sinks = torch.randn(h)
    args = (q, paged.k_cache, paged.v_cache, cu_seqlens(lens_q), cu_seqlens(lens_k),
            max(lens_q), max(lens_k), d ** -0.5, True, paged.block_table, -1, 0.0, sinks)
    prepared = []
    prepare = unified_launch.prepare
    monkeypatch.setattr(unified_launch, "prepare", lambda kernel, *a, **kw: prepared.append(
        kernel) or prepare(kernel, *a, **kw))
    bound = unified_launch.bind_prefill(*args, return_lse=True)
    assert prepared == [unified_launch.decode_balanced_kernel], prepared
    before = stats["bound"]
    out, lse = bound(*args, return_lse=True)
    assert stats["bound"] == before + 1
    ref, ref_lse = reference.prefill(*args, return_lse=True)
    assert_close(out, ref, *TOLERANCES[FP16], what="bound balanced few-query prefill")
    assert_close(lse, ref_lse, 1e-3, 1e-3, what="bound balanced few-query lse")


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("lens_q,lens_k", [
    ([4] * 16, [16384] + [1024] * 15),         # the default plan's WIDE row takes it
    ([1, 4, 2, 3] * 8, [9000, 13, 1, 2049] * 8),  # DEEP; lk < lq; short and long mixed
])
@pytest.mark.parametrize("balanced", [None, True])
def test_few_query_balanced_cuda(lens_q, lens_k, balanced):
    _case(lens_q, lens_k, 32, 8, 128, dtype=BF16, device="cuda", balanced=balanced,
          extra_rows=3)


@pytest.mark.cuda
@pytest.mark.parametrize("causal,softcap,sinks,fp8", [(True, 0.0, True, False),
                                                      (False, 30.0, False, False),
                                                      (True, 0.0, False, True)])
def test_few_query_balanced_options_cuda(causal, softcap, sinks, fp8):
    _case([4, 2, 1, 3] * 4, [5000, 77, 0, 2049] * 4, 32, 8, 128, dtype=BF16, device="cuda",
          causal=causal, softcap=softcap, with_sinks=sinks, fp8=fp8, block_size=64)


@pytest.mark.cuda
def test_few_query_balanced_under_cuda_graph_replays():
    # Captured once; replays with new key lengths (on the device) rebalance without a recapture.
    lens_q = [4] * 16
    paged = random_paged([4096] * 16, 8, 128, 16, BF16, device="cuda")  # every row mapped
    q = torch.randn(64, 32, 128, dtype=BF16, device="cuda")
    cu_q = cu_seqlens(lens_q, "cuda")
    cu_k = cu_seqlens([4096] + [256] * 15, "cuda")
    args = (q, paged.k_cache, paged.v_cache, cu_q, cu_k, 4, 4096, 128 ** -0.5, True,
            paged.block_table)
    unified_kernel.prefill(*args, balanced=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = unified_kernel.prefill(*args, balanced=True)
    for new in ([4096] + [256] * 15, [17] * 15 + [4096], [2] * 8 + [300] * 8):
        cu_k.copy_(cu_seqlens(new, "cuda"))
        out.fill_(float("nan"))
        graph.replay()
        assert_close(out, reference.prefill(*args), *TOLERANCES[BF16], what=f"replay {new[:2]}")
