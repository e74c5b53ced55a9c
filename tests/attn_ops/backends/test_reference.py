"""The reference backend against the independent float64 loop of tests/support/helpers.py.

Isolation of non-finite input and other adversarial cases: tests/attn_ops/test_adversarial.py.
"""

import pytest
import torch

import attn_ops
from tests.support.helpers import (TOLERANCES, assert_close, attention_f64, cu_seqlens, prefill_f64,
                           random_paged)

# The reference computes in fp32; compare with fp32 inputs tightly, low precision loosely.
REF_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
           torch.bfloat16: (1.6e-2, 1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lens_q,lens_k,h,hkv,d", [
    ([13], [13], 2, 2, 32),
    ([1, 7, 13], [1, 7, 13], 4, 2, 64),
    ([3, 0, 5], [8, 0, 5], 8, 2, 128),       # lq < lk (chunked prefill), empty sequence
    ([123], [123], 2, 1, 40),                # MQA, odd length, odd-ish head dim
    ([2, 4], [2, 4], 4, 1, 256),
])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_matches_float64(dtype, lens_q, lens_k, h, hkv, d, causal):
    q = torch.randn(sum(lens_q), h, d, dtype=dtype)
    k = torch.randn(sum(lens_k), hkv, d, dtype=dtype)
    v = torch.randn(sum(lens_k), hkv, d, dtype=dtype)
    out = attn_ops.prefill(q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q),
                           max(lens_k), d ** -0.5, causal, backend="reference")
    expected = prefill_f64(q, k, v, lens_q, lens_k, d ** -0.5, causal)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, expected, *REF_TOL[dtype])


@pytest.mark.parametrize("causal,window,softcap", [
    (True, 0, 0.0), (True, 3, 0.0), (False, 2, 0.0), (True, -1, 5.0), (False, 4, 2.0)])
def test_prefill_window_and_softcap(causal, window, softcap):
    lens_q, lens_k = [6, 11], [9, 11]
    q = torch.randn(17, 4, 32)
    k, v = torch.randn(20, 2, 32), torch.randn(20, 2, 32)
    out = attn_ops.prefill(q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), 11, 11, 0.3, causal,
                           None, window, softcap, backend="reference")
    assert_close(out, prefill_f64(q, k, v, lens_q, lens_k, 0.3, causal, window, softcap),
                 *REF_TOL[torch.float32])


def test_prefill_rows_that_see_no_key_are_zero():
    # window 0 non-causal on the first query of a 1-query / 3-key sequence still sees key 2;
    # an lk = 0 sequence with queries is out of contract, but a padded tail row (no sequence) is
    # in it: rows past cu_seqlens_q[-1] must be zero.
    q = torch.randn(6, 2, 32)
    k = torch.randn(4, 2, 32)
    out = attn_ops.prefill(q, k, k, cu_seqlens([4]), cu_seqlens([4]), 4, 4, 0.2,
                           backend="reference")
    assert torch.equal(out[4:], torch.zeros(2, 2, 32))
    assert not torch.isnan(out).any()


def test_paged_prefill_equals_dense():
    lens_q, lens_k = [3, 1, 7], [10, 5, 7]
    pb = random_paged(lens_k, 2, 64, 4, torch.float32)
    q = torch.randn(sum(lens_q), 4, 64)
    out = attn_ops.prefill(q, pb.k_cache, pb.v_cache, cu_seqlens(lens_q), cu_seqlens(lens_k), 7,
                           10, 0.125, True, pb.block_table, backend="reference")
    expected = prefill_f64(q, torch.cat(pb.k_dense), torch.cat(pb.v_dense), lens_q, lens_k, 0.125,
                           True)
    assert_close(out, expected, *REF_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,h,hkv,bs,window,softcap", [
    ([1, 17, 0, 33], 4, 2, 8, -1, 0.0), ([123, 5], 8, 1, 16, -1, 0.0),
    ([9, 30], 4, 4, 4, 5, 10.0), ([0, 0], 2, 1, 16, -1, 0.0)])
def test_decode_matches_float64(dtype, lens, h, hkv, bs, window, softcap):
    d = 64
    pb = random_paged(lens, hkv, d, bs, dtype, table_width=8)
    q = torch.randn(len(lens), h, d, dtype=dtype)
    out = attn_ops.decode(q, pb.k_cache, pb.v_cache, torch.tensor(lens, dtype=torch.int32),
                          pb.block_table, d ** -0.5, window, softcap, backend="reference")
    for b, n in enumerate(lens):
        expected = attention_f64(q[b:b + 1], pb.k_dense[b], pb.v_dense[b], d ** -0.5, True,
                                 window, softcap)[0]
        assert_close(out[b], expected, *REF_TOL[dtype], what=f"sequence {b}")
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("pattern", ["all", "some_padding", "all_padding"])
def test_store_kvcache_writes_exactly_the_slots(slot_dtype, pattern):
    nb, bs, hkv, d, t = 6, 4, 2, 32, 9
    k_cache = torch.randn(nb, bs, hkv, d)
    v_cache = torch.randn(nb, bs, hkv, d)
    k0, v0 = k_cache.clone(), v_cache.clone()
    key, value = torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    slots = torch.randperm(nb * bs)[:t]
    if pattern == "some_padding":
        slots[0] = slots[4] = slots[8] = -1
    elif pattern == "all_padding":
        slots[:] = -1
    attn_ops.store_kvcache(key, value, k_cache, v_cache, slots.to(slot_dtype), backend="reference")
    ek, ev = k0.view(-1, hkv, d).clone(), v0.view(-1, hkv, d).clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            ek[s], ev[s] = key[i], value[i]
    assert torch.equal(k_cache.view(-1, hkv, d), ek)
    assert torch.equal(v_cache.view(-1, hkv, d), ev)
