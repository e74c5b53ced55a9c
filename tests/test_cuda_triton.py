"""The Triton backend on a CUDA GPU: many shapes against the reference backend, CUDA graphs,
no host syncs, Inductor. Run with ``pytest -m cuda tests/test_cuda_triton.py``.

Outputs are poisoned with NaN before each kernel writes them; every comparison rejects NaN.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.support.helpers import TOLERANCES, assert_close, cu_seqlens, random_paged

pytestmark = pytest.mark.cuda
DEV = "cuda"
BF16, FP16 = torch.bfloat16, torch.float16


@pytest.fixture(autouse=True)
def _triton_on_gpu():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 runs the interpreter; these tests need compiled kernels")
    pytest.importorskip("triton")


def _kernels():
    from attn_ops.backends.triton import decode_kernel, prefill_kernel, store_kernel
    return store_kernel, prefill_kernel, decode_kernel


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


# ---------------------------------------------------------------------------------------------
# store_kvcache
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t,hkv,d,block_size,slot_dtype,dtype", [
    (1, 8, 128, 16, torch.int32, BF16), (64, 8, 128, 16, torch.int64, BF16),
    (123, 1, 64, 32, torch.int32, FP16), (4099, 8, 128, 256, torch.int64, BF16),
    (77, 3, 96, 64, torch.int64, FP16), (300, 2, 256, 128, torch.int32, BF16),
    (50, 4, 128, 24, torch.int32, torch.float32)])
def test_store_kvcache(t, hkv, d, block_size, slot_dtype, dtype):
    from attn_ops.backends import reference
    store, _, _ = _kernels()
    num_blocks = t // block_size + 4
    k_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=DEV)
    v_cache = torch.randn_like(k_cache)
    fused = torch.randn(t, 2, hkv, d, dtype=dtype, device=DEV)  # strided key/value views
    key, value = fused[:, 0], fused[:, 1]
    slots = torch.randperm(num_blocks * block_size, device=DEV)[:t].to(slot_dtype)
    slots[::7] = -1
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store.store_kvcache(key, value, k_cache, v_cache, slots)
    reference.store_kvcache(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_store_kvcache_is_one_launch():
    store, _, _ = _kernels()
    k_cache = torch.randn(64, 16, 8, 128, dtype=BF16, device=DEV)
    v_cache = torch.randn_like(k_cache)
    key = torch.randn(64, 8, 128, dtype=BF16, device=DEV)
    slots = torch.randperm(1024, device=DEV)[:64]
    store.store_kvcache(key, key, k_cache, v_cache, slots)  # compile outside the profile
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        store.store_kvcache(key, key, k_cache, v_cache, slots)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]


# ---------------------------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------------------------

def _prefill_case(lens_q, lens_k, h, hkv, d, dtype, causal, window_left=-1, softcap=0.0,
                  block_size=None, extra_rows=0):
    from attn_ops.backends import reference
    _, prefill, _ = _kernels()
    q = torch.randn(sum(lens_q) + extra_rows, h, d, dtype=dtype, device=DEV)
    if block_size is None:
        k = torch.randn(sum(lens_k), hkv, d, dtype=dtype, device=DEV)
        v, table = torch.randn_like(k), None
    else:
        paged = random_paged(lens_k, hkv, d, block_size, dtype, device=DEV)
        k, v, table = paged.k_cache, paged.v_cache, paged.block_table
    cu_q, cu_k = cu_seqlens(lens_q, DEV), cu_seqlens(lens_k, DEV)
    args = (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), d ** -0.5, causal, table,
            window_left, softcap)
    out = prefill.prefill(*args, out=_nan(q.shape, dtype))
    ref = reference.prefill(*args)
    assert_close(out, ref, *TOLERANCES[dtype], what="prefill")
    if extra_rows:
        assert torch.all(out[-extra_rows:] == 0)


@pytest.mark.parametrize("d", [64, 96, 128, 256, 40])
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_head_dims(d, dtype, causal):
    _prefill_case([300, 1, 0, 129], [300, 1, 0, 257], 8, 2, d, dtype, causal, extra_rows=5)


@pytest.mark.parametrize("h,hkv", [(32, 8), (16, 1), (6, 6), (12, 3)])
@pytest.mark.parametrize("window_left,softcap", [(-1, 0.0), (100, 0.0), (-1, 30.0), (0, 0.0)])
def test_prefill_gqa_window_softcap(h, hkv, window_left, softcap):
    _prefill_case([513, 77, 13], [513, 200, 13], h, hkv, 128, BF16, True, window_left, softcap)


@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_paged_prefix(block_size, causal):
    _prefill_case([200, 0, 31, 1], [700, 0, 31, 1000], 8, 2, 128, BF16, causal,
                  block_size=block_size)


def test_prefill_fp32_and_window_noncausal():
    _prefill_case([64, 100], [64, 300], 4, 2, 64, torch.float32, False, window_left=50)
    _prefill_case([333], [333], 4, 4, 128, FP16, False, window_left=17, softcap=5.0)


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------

def _decode_case(lens, h, hkv, d, block_size, dtype, window_left=-1, softcap=0.0, splits=None,
                 table_width=None):
    from attn_ops.backends import reference
    _, _, decode = _kernels()
    paged = random_paged(lens, hkv, d, block_size, dtype, device=DEV, table_width=table_width)
    q = torch.randn(len(lens), h, d, dtype=dtype, device=DEV)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    args = (q, paged.k_cache, paged.v_cache, seqlens, paged.block_table, d ** -0.5, window_left,
            softcap)
    out = decode.decode(*args, splits=splits, out=_nan(q.shape, dtype))
    ref = reference.decode(*args)
    assert_close(out, ref, *TOLERANCES[dtype], what="decode")
    return out


@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_decode_block_sizes(block_size, dtype):
    out = _decode_case([1000, 0, 1, 333, 4096], 32, 8, 128, block_size, dtype)
    assert torch.all(out[1] == 0)


@pytest.mark.parametrize("d", [64, 96, 256, 40])
@pytest.mark.parametrize("h,hkv", [(8, 8), (32, 4), (32, 1)])
def test_decode_head_dims_groups(d, h, hkv):
    _decode_case([517, 1, 0, 64], h, hkv, d, 16, BF16)


@pytest.mark.parametrize("splits", [1, 2, 7, 64])
@pytest.mark.parametrize("window_left,softcap", [(-1, 0.0), (300, 0.0), (-1, 50.0), (0, 0.0)])
def test_decode_splits_window_softcap(splits, window_left, softcap):
    _decode_case([2000, 5, 0, 900], 16, 4, 128, 64, FP16, window_left, softcap, splits=splits)


def test_decode_long_single_sequence_and_fp32():
    _decode_case([32768], 32, 8, 128, 256, BF16)
    _decode_case([3000, 0], 8, 2, 64, 16, torch.float32, table_width=256)


def test_decode_int64_block_table():
    from attn_ops.backends import reference
    _, _, decode = _kernels()
    paged = random_paged([300, 45], 2, 64, 16, BF16, device=DEV)
    q = torch.randn(2, 4, 64, dtype=BF16, device=DEV)
    seqlens = torch.tensor([300, 45], dtype=torch.int32, device=DEV)
    table = paged.block_table.long()
    out = decode.decode(q, paged.k_cache, paged.v_cache, seqlens, table, 0.125)
    ref = reference.decode(q, paged.k_cache, paged.v_cache, seqlens, table, 0.125)
    assert_close(out, ref, *TOLERANCES[BF16])


# ---------------------------------------------------------------------------------------------
# CUDA graphs, host syncs, Inductor
# ---------------------------------------------------------------------------------------------

def _random_step_inputs(b, width, page, num_blocks, hkv, h, d, max_len, gen):
    lens = torch.randint(0, max_len + 1, (b,), generator=gen)
    lens[0] = 0  # a padded row
    lens[-1] = max_len
    table = torch.randperm(num_blocks, generator=gen)[:b * width].view(b, width).to(torch.int32)
    last = (lens - 1).clamp(min=0)
    slots = table.gather(1, (last // page)[:, None])[:, 0].long() * page + last % page
    slots = torch.where(lens > 0, slots, -1)
    q = torch.randn(b, h, d, generator=gen)
    new_kv = torch.randn(2, b, hkv, d, generator=gen)
    return [x.to(DEV) for x in (lens.to(torch.int32), table, slots, q, new_kv)]


@pytest.mark.parametrize("page,width", [(16, 64), (256, 4)])
def test_cuda_graph_store_decode_replays_with_new_lengths(page, width):
    import attn_ops
    from attn_ops.backends import reference
    b, h, hkv, d = 4, 8, 2, 128
    num_blocks = b * width + 3
    k_cache = torch.randn(num_blocks, page, hkv, d, dtype=BF16, device=DEV)
    v_cache = torch.randn_like(k_cache)
    gen = torch.Generator().manual_seed(1)
    static = _random_step_inputs(b, width, page, num_blocks, hkv, h, d, width * page, gen)
    seqlens, table, slots, q, new_kv = static

    def step():
        attn_ops.store_kvcache(new_kv[0].to(BF16), new_kv[1].to(BF16), k_cache, v_cache, slots)
        return attn_ops.decode(q.to(BF16), k_cache, v_cache, seqlens, table, d ** -0.5)

    with attn_ops.use_backend("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # compile and warm up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
    for _ in range(3):
        fresh = _random_step_inputs(b, width, page, num_blocks, hkv, h, d, width * page, gen)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        reference.store_kvcache(new_kv[0].to(BF16), new_kv[1].to(BF16), k_ref, v_ref, slots)
        expected = reference.decode(q.to(BF16), k_ref, v_ref, seqlens, table, d ** -0.5)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
        assert_close(out, expected, *TOLERANCES[BF16], what="replayed decode")
        assert torch.all(out[0] == 0)


def test_wrappers_never_sync_the_host(monkeypatch):
    import attn_ops
    monkeypatch.setenv("ATTN_OPS_CHECK", "0")  # the opt-in data checks do sync, by design
    lens = [100, 0, 37]
    paged = random_paged(lens, 2, 64, 16, BF16, device=DEV)
    q = torch.randn(3, 8, 64, dtype=BF16, device=DEV)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    key = torch.randn(3, 2, 64, dtype=BF16, device=DEV)
    slots = torch.tensor([5, -1, 40], device=DEV)
    qp = torch.randn(137, 8, 64, dtype=BF16, device=DEV)
    cu = cu_seqlens(lens, DEV)
    calls = [
        lambda: attn_ops.store_kvcache(key, key, paged.k_cache, paged.v_cache, slots),
        lambda: attn_ops.decode(q, paged.k_cache, paged.v_cache, seqlens, paged.block_table, 0.1),
        lambda: attn_ops.prefill(qp, paged.k_cache, paged.v_cache, cu, cu, 100, 100, 0.1, True,
                                 paged.block_table),
    ]
    with attn_ops.use_backend("triton"):
        for call in calls:
            call()  # compile first: compilation may query the device
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for call in calls:
                call()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_inductor_compiled_prefill_and_decode():
    import attn_ops
    torch._dynamo.reset()
    lens = [64, 13]
    paged = random_paged(lens, 2, 128, 16, BF16, device=DEV)
    q = torch.randn(77, 8, 128, dtype=BF16, device=DEV)
    cu = cu_seqlens(lens, DEV)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)

    def fn(q, k_cache, v_cache, cu, seqlens, table):
        o = attn_ops.prefill(q, k_cache, v_cache, cu, cu, 64, 64, 0.088, True, table)
        last = o[cu[1:] - 1]  # the last token of each sequence attends again through decode
        return attn_ops.decode(last * 2, k_cache, v_cache, seqlens, table, 0.088)

    args = (q, paged.k_cache, paged.v_cache, cu, seqlens, paged.block_table)
    with attn_ops.use_backend("reference"):
        expected = fn(*args)
    with attn_ops.use_backend("triton"):
        got = torch.compile(fn, fullgraph=True)(*args)
    assert_close(got, expected, *TOLERANCES[BF16])
