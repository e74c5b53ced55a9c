"""Hypothesis fuzzing of shapes and lengths: reference backend vs the float64 loop."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attn_ops
from tests.support.helpers import assert_close, attention_f64, cu_seqlens, prefill_f64, random_paged

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def prefill_case(draw):
    b = draw(st.integers(0, 4))
    lens_k = draw(st.lists(st.integers(0, 19), min_size=b, max_size=b))
    lens_q = [draw(st.integers(min(1, n), n)) if n else 0 for n in lens_k]
    hkv = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 4]))
    d = draw(st.sampled_from([8, 16, 24, 40]))
    causal = draw(st.booleans())
    window = draw(st.sampled_from([-1, 0, 1, 5]))
    softcap = draw(st.sampled_from([0.0, 3.0]))
    paged = draw(st.booleans())
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    return lens_q, lens_k, hkv * group, hkv, d, causal, window, softcap, paged, block_size


@SETTINGS
@given(prefill_case())
def test_prefill_fuzz(case):
    lens_q, lens_k, h, hkv, d, causal, window, softcap, paged, block_size = case
    q = torch.randn(sum(lens_q), h, d)
    k = torch.randn(sum(lens_k), hkv, d)
    v = torch.randn(sum(lens_k), hkv, d)
    table = None
    kk, vv = k, v
    if paged and lens_k:
        pb = random_paged(lens_k, hkv, d, block_size, torch.float32)
        kk, vv, table = pb.k_cache, pb.v_cache, pb.block_table
        k, v = torch.cat(pb.k_dense), torch.cat(pb.v_dense)
    out = attn_ops.prefill(q, kk, vv, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q, default=0),
                           max(lens_k, default=0), d ** -0.5, causal, table, window, softcap,
                           backend="reference")
    expected = prefill_f64(q, k, v, lens_q, lens_k, d ** -0.5, causal, window, softcap)
    assert_close(out, expected, 1e-5, 1e-5)


@SETTINGS
@given(st.lists(st.integers(0, 40), min_size=1, max_size=5), st.sampled_from([1, 2, 4]),
       st.sampled_from([1, 4, 16]), st.sampled_from([-1, 0, 7]), st.sampled_from([0.0, 4.0]))
def test_decode_fuzz(lens, group, block_size, window, softcap):
    hkv, d = 2, 16
    pb = random_paged(lens, hkv, d, block_size, torch.float32)
    q = torch.randn(len(lens), hkv * group, d)
    out = attn_ops.decode(q, pb.k_cache, pb.v_cache, torch.tensor(lens, dtype=torch.int32),
                          pb.block_table, 0.25, window, softcap, backend="reference")
    for b in range(len(lens)):
        want = attention_f64(q[b:b + 1], pb.k_dense[b], pb.v_dense[b], 0.25, True, window,
                             softcap)[0]
        assert_close(out[b], want, 1e-5, 1e-5)
