"""The unified paged kernel (unified_kernel.py): GQA-packed rows, split-KV with the LSE merge,
varlen tiles found by a device-side search. The interpreter at tiny shapes (CI) and, marked
``cuda``, compiled on a GPU; always against the reference backend with NaN-poisoned outputs."""

from __future__ import annotations

import pytest
import torch

from attn_ops.backends import reference
from tests.support.helpers import (TOLERANCES, assert_close, cu_seqlens, laid_apart,
                                   random_paged, record_launches)

triton = pytest.importorskip("triton")
from attn_ops.backends.triton import (common, decode_plan, unified_kernel,  # noqa: E402
                                      unified_launch, unified_plan)

BF16, FP16 = torch.bfloat16, torch.float16


def _prefill_case(lens_q, lens_k, h, hkv, d, dtype=FP16, causal=True, window_left=-1,
                  softcap=0.0, block_size=16, extra_rows=0, splits=None, config=None,
                  device="cpu"):
    """One call against the reference; ``block_size=None`` reads packed dense K/V."""
    q = torch.randn(sum(lens_q) + extra_rows, h, d, dtype=dtype, device=device)
    if block_size is None:
        k = torch.randn(sum(lens_k), hkv, d, dtype=dtype, device=device)
        v, table = torch.randn_like(k), None
    else:
        paged = random_paged(lens_k, hkv, d, block_size, dtype, device=device)
        k, v, table = paged.k_cache, paged.v_cache, paged.block_table
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    args = (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), d ** -0.5, causal, table,
            window_left, softcap)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
    unified_kernel.prefill(*args, splits=splits, config=config, out=out)
    assert_close(out, reference.prefill(*args), *TOLERANCES[dtype], what="unified prefill")
    if extra_rows:
        assert torch.all(out[-extra_rows:] == 0)
    return out


def _decode_case(lens, h, hkv, d, block_size=16, dtype=FP16, window_left=-1, softcap=0.0,
                 splits=None, device="cpu"):
    paged = random_paged(lens, hkv, d, block_size, dtype, device=device)
    q = torch.randn(len(lens), h, d, dtype=dtype, device=device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    args = (q, paged.k_cache, paged.v_cache, seqlens, paged.block_table, d ** -0.5, window_left,
            softcap)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
    unified_kernel.decode(*args, splits=splits, out=out)
    assert_close(out, reference.decode(*args), *TOLERANCES[dtype], what="unified decode")
    return out


# ---------------------------------------------------------------------------------------------
# interpreter (tiles of 16 rows: a sequence of more than 16 / G queries takes the large path)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("h,hkv", [(4, 1), (4, 2), (2, 2)])
def test_few_queries_paged(splits, h, hkv):
    # 1, 4, 2 queries per sequence over longer paged prefixes (speculative verification), an
    # empty sequence, a query-less sequence with keys
    _prefill_case([1, 4, 0, 2, 0], [13, 40, 0, 3, 7], h, hkv, 32, splits=splits)


@pytest.mark.parametrize("causal,window_left,softcap", [
    (True, -1, 0.0), (False, -1, 0.0), (True, 5, 0.0), (True, -1, 3.0), (False, 7, 2.0)])
@pytest.mark.parametrize("splits", [1, 2])
def test_mixed_batch_paged(causal, window_left, softcap, splits):
    # decode rows, speculative rows and a chunk over a prefix in one call; padding rows after
    _prefill_case([1, 13, 0, 4, 1], [37, 13, 5, 20, 1], 4, 2, 32, causal=causal,
                  window_left=window_left, softcap=softcap, extra_rows=3, splits=splits)


@pytest.mark.parametrize("causal", [True, False])
def test_dense_varlen_odd_lengths(causal):
    _prefill_case([13, 0, 23, 1], [13, 0, 23, 9], 4, 2, 40, dtype=BF16, causal=causal,
                  block_size=None, extra_rows=2)


@pytest.mark.parametrize("one_loop,fused", [(False, False), (True, False), (False, True)])
def test_loop_and_merge_variants(one_loop, fused):
    # the three-loop small path and the second-launch merge (the defaults are one loop, fused)
    cfg = unified_plan.Config(16, 16, 16, 4, 1, one_loop, fused)
    _prefill_case([1, 13, 0, 4], [37, 13, 5, 20], 4, 2, 32, window_left=6, extra_rows=2,
                  splits=3, config=cfg)


@pytest.mark.parametrize("splits", [1, 2])
def test_eight_queries_in_a_padded_sixty_four_row_tile(splits):
    # unified_plan's Hopper rule: 8 queries at G = 4 (32 packed rows) in a 64-row small tile,
    # half of it padding, over a paged cache; fewer queries, an empty sequence among them
    cfg = unified_plan.Config(64, 0, 16, 4, 1)
    _prefill_case([8, 8, 0, 3, 8], [45, 8, 6, 19, 30], 8, 2, 32, splits=splits, config=cfg)


def test_fused_merge_leaves_semaphores_zero():
    from attn_ops.backends.triton.split_counters import semaphores
    _prefill_case([1, 4, 2], [40, 30, 3], 4, 2, 32, splits=4)
    _decode_case([13, 40, 1], 4, 2, 32, splits=4)
    assert torch.count_nonzero(semaphores(1, torch.device("cpu"))) == 0


def test_long_odd_sequence_many_tiles():
    _prefill_case([123], [123], 2, 1, 32, block_size=None, splits=1)


def test_block_size_and_fp32():
    _prefill_case([3, 9], [30, 9], 4, 2, 32, dtype=torch.float32, block_size=8, splits=2)


@pytest.mark.parametrize("splits", [None, 1, 4])
@pytest.mark.parametrize("window_left,softcap", [(-1, 0.0), (5, 0.0), (-1, 2.0)])
def test_decode_mode(splits, window_left, softcap):
    out = _decode_case([13, 0, 40, 1], 4, 2, 32, window_left=window_left, softcap=softcap,
                       splits=splits)
    assert torch.all(out[1] == 0)


def test_strided_index_tensors_and_caches():
    lens_q, lens_k = [2, 7], [19, 7]
    pb = random_paged(lens_k, 2, 32, 8, FP16)
    k_cache = pb.k_cache.transpose(1, 2).contiguous().transpose(1, 2)
    v_cache = pb.v_cache.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.full((2, 2 * pb.block_table.shape[1]), -7, dtype=torch.int32)
    wide[:, ::2] = pb.block_table
    cu_q = torch.stack([cu_seqlens(lens_q), cu_seqlens(lens_q) * 0 + 99], 1)[:, 0]
    cu_k = torch.stack([cu_seqlens(lens_k), cu_seqlens(lens_k) * 0 + 99], 1)[:, 0]
    q = torch.randn(9, 4, 32, dtype=FP16)
    out = torch.full(q.shape, float("nan"), dtype=FP16)
    unified_kernel.prefill(q, k_cache, v_cache, cu_q, cu_k, 7, 19, 0.2, True, wide[:, ::2],
                           splits=2, out=out)
    ref = reference.prefill(q, pb.k_cache, pb.v_cache, cu_seqlens(lens_q), cu_seqlens(lens_k), 7,
                            19, 0.2, True, pb.block_table)
    assert_close(out, ref, *TOLERANCES[FP16], what="unified prefill, strided inputs")


@pytest.mark.parametrize("balanced", [False, True])
def test_kv_strides_apart(monkeypatch, balanced):
    # Paged K and V that share block and in-page strides are read at one offset per key
    # (KV_SAME_STRIDES); a V cache laid out otherwise (helpers.laid_apart) at
    # its own. The unified kernel (a 2-query and a 9-query sequence: both paths) and the
    # balanced kernel's few-query mode (forced), with the same K.
    lens_q, lens_k = [2, 9, 1], [19, 30, 0]
    pb = random_paged(lens_k, 2, 32, 8, FP16)
    v_apart = laid_apart(pb.v_cache)
    q = torch.randn(sum(lens_q), 4, 32, dtype=FP16)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    seen = record_launches(monkeypatch, unified_launch, "KV_SAME_STRIDES")
    ref = reference.prefill(q, pb.k_cache, pb.v_cache, cu_q, cu_k, 9, 30, 0.2, True,
                            pb.block_table)
    for v, same in ((v_apart, False), (pb.v_cache, True)):
        out = torch.full(q.shape, float("nan"), dtype=FP16)
        unified_kernel.prefill(q, pb.k_cache, v, cu_q, cu_k, 9, 30, 0.2, True, pb.block_table,
                               out=out, balanced=balanced)
        assert_close(out, ref, *TOLERANCES[FP16], what=f"V strides {v.stride()}")
        assert seen[0] is same, seen  # the first launch: the unified or the balanced kernel
        seen.clear()


def test_split_count_and_grid_are_static():
    # the grid depends on (Tq, B, H, Hkv, max_seqlen_q, capacity) only, never on lengths
    plan = unified_plan.plan
    splits, grid, consts, _ = plan(256, 64, 32, 8, 128, 4, 2048, BF16, torch.device("cpu"),
                                   False, True, True, 16, False, False,
                                   unified_plan.Config(16, 0, 64, 4, 3), None)
    assert grid == (64 + 1, 8, splits) and consts["SMALL_PATH"] and not consts["LARGE_PATH"]
    assert unified_plan.num_splits(64 * 8, 2048, 132, 64) == 1
    assert unified_plan.num_splits(16 * 8, 4096, 132, 64) == 4
    assert unified_plan.num_splits(1, 10 ** 7, 132, 64) == decode_plan._MAX_SPLITS
    assert unified_plan.num_splits(8, 100, 132, 64) == 1  # a tiny key bound: no split


def test_thirty_two_row_tiles_take_long_steps_and_count_twice(monkeypatch):
    # 8 queries at G = 4: one 32-row small tile of 128-key steps, split as if twice the
    # programs (B 16 over 2048 keys: 2 splits where 16-row tiles take 4)
    monkeypatch.setattr(unified_plan, "INTERPRET", False)
    assert unified_plan.launch_config(32, 128, BF16) == unified_plan.Config(32, 0, 128, 4, 3)
    assert unified_plan.launch_config(16, 128, BF16).block_n == 64
    assert unified_plan.launch_config(32, 256, BF16).block_n == 32  # wide rows: unchanged
    monkeypatch.setattr(unified_plan, "device_sm_count", lambda device: 132)
    unified_plan.plan.cache_clear()
    try:
        def splits(nq):  # dense K/V: the paged cache's WIDE rule (below) stays out
            return unified_plan.plan(16 * nq, 16, 32, 8, 128, nq, 2048, BF16,
                                     torch.device("cpu"), False, True, False, 0, False,
                                     False, None, None)[0]
        assert (splits(4), splits(8)) == (4, 2)
    finally:
        unified_plan.plan.cache_clear()


def test_one_program_per_sm_over_a_paged_cache_takes_the_wide_pipeline(monkeypatch):
    # Small tiles alone over a paged cache with about one (tile, kv head) program per SM (B 16
    # x 8 kv heads on 132 SMs; B 8 with 2 splits): decode_kernel's WIDE pipeline, 128-key
    # steps and 5 stages, its split count. Not at B 64 (4 programs per SM), dense K/V, a
    # given config, or tiles with a large path.
    monkeypatch.setattr(unified_plan, "INTERPRET", False)
    monkeypatch.setattr(unified_plan, "device_sm_count", lambda device: 132)
    unified_plan.plan.cache_clear()

    def plan(b, nq, paged=True, config=None, ctx=2048):
        splits, grid, consts, _ = unified_plan.plan(
            b * nq, b, 32, 8, 128, nq, ctx, BF16, torch.device("cpu"), False, True, paged,
            16 if paged else 0, False, False, config, None)
        return splits, consts["BLOCK_N"], consts["num_stages"], grid
    try:
        for nq in (1, 4, 8):
            assert plan(16, nq)[:3] == (1, 128, 5)
        assert plan(8, 4, ctx=4096)[:3] == (2, 128, 5)
        assert plan(16, 4)[3] == (17, 8, 1)
        assert plan(64, 4)[1:3] == (64, 2)  # one split, two stages (the rule for B 64)
        assert plan(16, 4, paged=False)[:3] == (4, 64, 3)
        assert plan(16, 4, config=unified_plan.Config(16, 0, 64, 4, 3))[:3] == (4, 64, 3)
        assert plan(16, 32)[1] == 64  # 128 packed rows: large tiles, no WIDE
    finally:
        unified_plan.plan.cache_clear()


def test_thirty_two_row_tiles_prefer_wide_and_three_stages_to_splits(monkeypatch):
    # 8 queries at G = 4 (32-row tiles) over a paged cache: B 12 x 8 kv heads (0.73 programs
    # per SM) take WIDE unsplit where the wave rule gave 3 splits; 16-row tiles there keep the
    # rule; below 0.7 per SM (B 11) the rule stands; more, 64-row tiles on sm90 (below).
    monkeypatch.setattr(unified_plan, "INTERPRET", False)
    monkeypatch.setattr(unified_plan, "device_sm_count", lambda device: 132)
    monkeypatch.setattr(unified_plan, "device_is_sm90", lambda device: True)
    unified_plan.plan.cache_clear()

    def planned(b, nq, ctx, paged):
        return unified_plan.plan(b * nq, b, 32, 8, 128, nq, ctx, BF16, torch.device("cpu"),
                                 False, True, paged, 16 if paged else 0, False, False, None,
                                 None)

    def plan(b, nq, ctx=4096, paged=True):
        splits, _, consts, _ = planned(b, nq, ctx, paged)
        return splits, consts["BLOCK_N"], consts["num_stages"]

    def small_rows(b, nq):
        return planned(b, nq, 2048, True)[2]["SMALL_M"]
    try:
        assert plan(12, 8) == (1, 128, 5)
        assert plan(11, 8) == (3, 128, 3)
        assert plan(12, 4) == (5, 64, 3)
        assert plan(64, 4, 2048) == (1, 64, 2)
        # past one program per SM: 64-row tiles (Hopper's wgmma), 64-key steps, 5 stages, one
        # split; at B 16 (WIDE, one split) over 8192+ keys the same tiles in two splits
        assert plan(64, 8, 2048) == (1, 64, 5) and plan(17, 8, 2048) == (1, 64, 5)
        assert plan(16, 8, 8192) == (2, 64, 5) and plan(16, 8, 4096) == (1, 128, 5)
        assert small_rows(64, 8) == 64 and small_rows(16, 8) == 32
        # dense K/V at B 64: 32-row tiles, one split, 3 stages kept (16-row tiles: 2)
        assert plan(64, 8, 2048, paged=False) == (1, 128, 3)
        unified_plan.plan.cache_clear()  # not Hopper: no wgmma, 32-row tiles stay
        monkeypatch.setattr(unified_plan, "device_is_sm90", lambda device: False)
        assert plan(64, 8, 2048) == (1, 128, 3) and small_rows(64, 8) == 32
        assert plan(16, 8, 8192) == (1, 128, 5)
        assert not common.device_is_sm90(torch.device("cpu"))
    finally:
        unified_plan.plan.cache_clear()


# ---------------------------------------------------------------------------------------------
# CUDA (the static tables' tiles: small path up to 64 packed rows, 128-row large tiles)
# ---------------------------------------------------------------------------------------------

DEV = "cuda"


@pytest.mark.cuda
@pytest.mark.parametrize("queries", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("block_size", [16, 256])
def test_few_queries_paged_cuda(queries, block_size):
    lens_k = [2000, 0, 1, 333, 4096, 77]
    lens_q = [min(queries, n) for n in lens_k]
    _prefill_case(lens_q, lens_k, 32, 8, 128, dtype=BF16, block_size=block_size, device=DEV)


@pytest.mark.cuda
@pytest.mark.parametrize("batch,ctx,rows", [(20, 701, 64), (16, 8192, 64), (12, 900, 32)])
def test_eight_queries_on_the_planned_tiles_cuda(batch, ctx, rows):
    # 8 queries at G = 4 over a paged cache: the tiles plan() picks on an H200 (64 rows with
    # wgmma past one program per SM, or at B 16 over 8192 keys in two splits; B 12: WIDE
    # unsplit, 32 rows), an empty and a short sequence among them
    lens_k = [ctx - 13 * i for i in range(batch)]
    lens_k[1], lens_k[2] = 0, 5
    lens_q = [min(8, n) for n in lens_k]
    planned = unified_plan.plan(sum(lens_q), batch, 32, 8, 128, 8, ctx, BF16,
                                torch.device(DEV), False, True, True, 16, False, False, None,
                                None)
    if common.device_is_sm90(torch.device(DEV)) and common.device_sm_count(
            torch.device(DEV)) == 132:
        assert planned[2]["SMALL_M"] == rows
    _prefill_case(lens_q, lens_k, 32, 8, 128, dtype=BF16, device=DEV)


@pytest.mark.cuda
@pytest.mark.parametrize("splits", [None, 1, 5])
def test_mixed_batch_cuda(splits):
    # 12 decode rows, 4 sequences of 4 speculative rows, 2 chunks of 123 / 512 over prefixes
    lens_q = [1] * 12 + [4] * 4 + [123, 512]
    lens_k = [1000 + 37 * i for i in range(12)] + [700, 0 + 4, 2048, 31] + [1123, 4608]
    _prefill_case(lens_q, lens_k, 32, 8, 128, dtype=BF16, extra_rows=5, splits=splits,
                  device=DEV)


@pytest.mark.cuda
@pytest.mark.parametrize("d", [64, 96, 128, 256, 40])
@pytest.mark.parametrize("h,hkv", [(32, 8), (16, 1), (6, 6)])
def test_dense_short_prompts_cuda(d, h, hkv):
    gen = torch.Generator().manual_seed(d + h)
    lens = torch.randint(1, 400, (24,), generator=gen).tolist()
    lens[3] = 0
    _prefill_case(lens, lens, h, hkv, d, dtype=FP16, block_size=None, extra_rows=3, device=DEV)


@pytest.mark.cuda
@pytest.mark.parametrize("window_left,softcap", [(100, 0.0), (-1, 30.0), (0, 0.0)])
@pytest.mark.parametrize("causal", [True, False])
def test_window_softcap_cuda(window_left, softcap, causal):
    _prefill_case([3, 513, 1, 77], [900, 513, 1, 200], 32, 8, 128, dtype=BF16, causal=causal,
                  window_left=window_left, softcap=softcap, device=DEV)


@pytest.mark.cuda
def test_fp32_cuda():
    _prefill_case([4, 100], [300, 300], 8, 2, 64, dtype=torch.float32, device=DEV)
    _prefill_case([4, 100], [300, 300], 8, 2, 64, dtype=torch.float32, block_size=None,
                  device=DEV)


@pytest.mark.cuda
@pytest.mark.parametrize("configs", [(16, 128, 64, 8, 3), (32, 64, 64, 4, 3), (16, 64, 32, 4, 2),
                                     (64, 0, 64, 4, 3), (0, 64, 64, 4, 3)])
def test_configs_cuda(configs):
    # every config a benchmark may time computes the same function (small/large paths alone too)
    cfg = unified_plan.Config(*configs)
    lens_q = [1, 4, 16] if cfg.block_m == 0 else [1, 4, 16, 300]
    lens_k = [1500, 900, 16, 2300][:len(lens_q)]
    _prefill_case(lens_q, lens_k, 32, 8, 128, dtype=BF16, config=cfg, device=DEV)


@pytest.mark.cuda
@pytest.mark.parametrize("batch,ctx", [(1, 32768), (16, 2048), (64, 1000), (3, 5)])
def test_decode_mode_cuda(batch, ctx):
    lens = [ctx - 7 * i for i in range(batch)]
    lens[0] = 0 if batch > 1 else ctx
    _decode_case(lens, 32, 8, 128, dtype=BF16, device=DEV)


@pytest.mark.cuda
def test_cuda_graph_replays_with_new_lengths():
    b, h, hkv, d, page, width = 6, 32, 8, 128, 16, 64
    num_blocks = b * width
    k_cache = torch.randn(num_blocks, page, hkv, d, dtype=BF16, device=DEV)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(num_blocks, device=DEV)[: b * width].view(b, width).to(torch.int32)
    total_q, max_q = 40, 16
    q = torch.randn(total_q, h, d, dtype=BF16, device=DEV)
    cu_q = torch.zeros(b + 1, dtype=torch.int32, device=DEV)
    cu_k = torch.zeros(b + 1, dtype=torch.int32, device=DEV)
    gen = torch.Generator().manual_seed(3)

    def new_lengths():
        lq = torch.randint(0, max_q + 1, (b,), generator=gen)
        lq = (lq * total_q // max(int(lq.sum()), total_q)).clamp(max=max_q)
        lk = lq + torch.randint(0, width * page - max_q, (b,), generator=gen)
        cu_q.copy_(torch.cat([torch.zeros(1), lq.cumsum(0)]).to(torch.int32))
        cu_k.copy_(torch.cat([torch.zeros(1), lk.cumsum(0)]).to(torch.int32))

    def call():
        return unified_kernel.prefill(q, k_cache, v_cache, cu_q, cu_k, max_q, width * page,
                                      d ** -0.5, True, table)

    new_lengths()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for _ in range(3):
        new_lengths()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.prefill(q, k_cache, v_cache, cu_q, cu_k, max_q, width * page,
                                     d ** -0.5, True, table)
        assert_close(out, expected, *TOLERANCES[BF16], what="replayed unified prefill")


@pytest.mark.cuda
def test_wrappers_never_sync_the_host_cuda():
    paged = random_paged([100, 0, 37], 8, 128, 16, BF16, device=DEV)
    q = torch.randn(9, 32, 128, dtype=BF16, device=DEV)
    cu_q, cu_k = cu_seqlens([4, 0, 5], DEV), cu_seqlens([100, 0, 37], DEV)
    seqlens = torch.tensor([100, 0, 37], dtype=torch.int32, device=DEV)
    calls = [lambda: unified_kernel.prefill(q, paged.k_cache, paged.v_cache, cu_q, cu_k, 5, 100,
                                            0.1, True, paged.block_table),
             lambda: unified_kernel.decode(q[:3], paged.k_cache, paged.v_cache, seqlens,
                                           paged.block_table, 0.1)]
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in calls:
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_unified_small_path_fits_its_splits_the_same_way():
    counts = [unified_plan.num_splits(b * 8, 2048 * 16, 132, 64, decode_plan.DEFAULT_RESIDENT)
              for b in (17, 20, 24, 34, 40, 48, 64)]
    assert counts == [3, 3, 2, 3, 3, 1, 1]
    assert [unified_plan.num_splits(b * 8, 2048 * 16, 132, 64) for b in (24, 34)] == [3, 2]
