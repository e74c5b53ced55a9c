"""The sdpa backend against the reference (and so the float64 oracle) on the contract's cases."""

import pytest
import torch

import attn_ops
from tests.support.helpers import TOLERANCES, assert_close, cu_seqlens, random_paged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens_q,lens_k,h,hkv,d,causal,window", [
    ([13], [13], 2, 2, 32, True, -1),
    ([1, 7, 13], [1, 7, 13], 4, 2, 64, True, -1),
    ([3, 0, 5], [8, 0, 5], 8, 2, 128, True, -1),   # lq < lk, an empty sequence
    ([123], [123], 4, 1, 64, False, -1),           # MQA, odd length
    ([6, 11], [9, 11], 4, 2, 32, True, 3),
    ([6, 11], [9, 11], 4, 2, 32, False, 0),
])
@pytest.mark.parametrize("paged", [False, True])
def test_prefill_matches_reference(dtype, lens_q, lens_k, h, hkv, d, causal, window, paged):
    q = torch.randn(sum(lens_q) + 2, h, d, dtype=dtype)  # 2 tail rows owned by no sequence
    if paged:
        pb = random_paged(lens_k, hkv, d, 4, dtype)
        k, v, table = pb.k_cache, pb.v_cache, pb.block_table
    else:
        k = torch.randn(sum(lens_k), hkv, d, dtype=dtype)
        v = torch.randn_like(k)
        table = None
    args = (q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k), d ** -0.5,
            causal, table, window, 0.0)
    got = attn_ops.prefill(*args, backend="sdpa")
    want = attn_ops.prefill(*args, backend="reference")
    assert got.dtype == dtype
    assert_close(got, want, *TOLERANCES[dtype])
    assert torch.equal(got[-2:], torch.zeros_like(got[-2:]))


@pytest.mark.parametrize("lens,h,hkv,bs,window", [
    ([1, 17, 0, 33], 4, 2, 8, -1), ([123, 5], 8, 1, 16, -1), ([9, 30], 4, 4, 4, 5), ([0, 0], 2, 1, 16, -1)])
def test_decode_matches_reference(lens, h, hkv, bs, window):
    pb = random_paged(lens, hkv, 64, bs, torch.float32, table_width=8)
    args = (torch.randn(len(lens), h, 64), pb.k_cache, pb.v_cache,
            torch.tensor(lens, dtype=torch.int32), pb.block_table, 0.125, window, 0.0)
    got = attn_ops.decode(*args, backend="sdpa")
    assert_close(got, attn_ops.decode(*args, backend="reference"), *TOLERANCES[torch.float32])
    for b, n in enumerate(lens):
        if n == 0:
            assert torch.equal(got[b], torch.zeros_like(got[b]))


def test_softcap_is_refused_with_a_reason():
    q = torch.randn(4, 2, 32)
    cu = cu_seqlens([4])
    with pytest.raises(attn_ops.BackendUnavailable, match="softcap is not expressible"):
        attn_ops.prefill(q, q, q, cu, cu, 4, 4, 0.1, True, None, -1, 5.0, backend="sdpa")


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("window", [-1, 3])
def test_traces_fullgraph_without_host_sync(backend, window):
    # fullgraph fails on a graph break, which .item(), .tolist() or `if tensor:` would cause;
    # window 3 takes the path that zeroes non-finite hidden keys.
    torch._dynamo.reset()
    from attn_ops.registry import get_backend_module
    module = get_backend_module(backend)
    pb = random_paged([5, 0], 2, 32, 4, torch.float32)
    args = (torch.randn(2, 4, 32), pb.k_cache, pb.v_cache, torch.tensor([5, 0], dtype=torch.int32),
            pb.block_table, 0.2, window)
    fn = torch.compile(module.decode, backend="aot_eager", fullgraph=True)
    assert_close(fn(*args), module.decode(*args), 1e-6, 1e-6)
    q, k = torch.randn(9, 4, 32), torch.randn(9, 2, 32)
    cu = cu_seqlens([4, 5])
    args = (q, k, k.clone(), cu, cu, 5, 5, 0.2, True, None, window)
    fn = torch.compile(module.prefill, backend="aot_eager", fullgraph=True)
    assert_close(fn(*args), module.prefill(*args), 1e-6, 1e-6)
