"""Hypothesis fuzzing of shapes and lengths: reference backend vs the float64 loop (outputs and
log-sum-exps, with and without sinks), merge_states over random splits, FP8 caches."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attn_ops
from attn_ops.backends import reference
from tests.support.helpers import (assert_close, attention_f64, cu_seqlens, fp8_meaning,
                                   prefill_f64, random_paged)

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def prefill_case(draw):
    b = draw(st.integers(0, 4))
    causal = draw(st.booleans())
    lens_k = draw(st.lists(st.integers(0, 19), min_size=b, max_size=b))
    if causal:  # lq <= lk (the contract's precondition)
        lens_q = [draw(st.integers(min(1, n), n)) if n else 0 for n in lens_k]
    else:  # any lq: more queries than keys, and queries over no key (zeros, lse -inf)
        lens_q = [draw(st.integers(0, 19)) for _ in lens_k]
    hkv = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 4]))
    d = draw(st.sampled_from([8, 16, 24, 40]))
    window = draw(st.sampled_from([-1, 0, 1, 5]))
    softcap = draw(st.sampled_from([0.0, 3.0]))
    paged = draw(st.booleans())
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    sinks = draw(st.booleans())
    return lens_q, lens_k, hkv * group, hkv, d, causal, window, softcap, paged, block_size, sinks


@SETTINGS
@given(prefill_case())
def test_prefill_fuzz(case):
    lens_q, lens_k, h, hkv, d, causal, window, softcap, paged, block_size, with_sinks = case
    q = torch.randn(sum(lens_q), h, d)
    k = torch.randn(sum(lens_k), hkv, d)
    v = torch.randn(sum(lens_k), hkv, d)
    table = None
    kk, vv = k, v
    if paged and lens_k:
        pb = random_paged(lens_k, hkv, d, block_size, torch.float32)
        kk, vv, table = pb.k_cache, pb.v_cache, pb.block_table
        k, v = torch.cat(pb.k_dense), torch.cat(pb.v_dense)
    sinks = torch.randn(h) * 3 if with_sinks else None
    out, lse = attn_ops.prefill_with_lse(q, kk, vv, cu_seqlens(lens_q), cu_seqlens(lens_k),
                                         max(lens_q, default=0), max(lens_k, default=0),
                                         d ** -0.5, causal, table, window, softcap, sinks,
                                         backend="reference")
    expected, expected_lse = prefill_f64(q, k, v, lens_q, lens_k, d ** -0.5, causal, window,
                                         softcap, sinks, return_lse=True)
    assert_close(out, expected, 1e-5, 1e-5)
    assert_close(lse, expected_lse, 1e-5, 1e-5, "lse")
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))


@SETTINGS
@given(st.lists(st.integers(0, 40), min_size=1, max_size=5), st.sampled_from([1, 2, 4]),
       st.sampled_from([1, 4, 16]), st.sampled_from([-1, 0, 7]), st.sampled_from([0.0, 4.0]),
       st.booleans(), st.sampled_from([None, (), (2,)]))
def test_decode_fuzz(lens, group, block_size, window, softcap, with_sinks, fp8_scale):
    """fp8_scale: None (fp32 cache), or the shape of the scales of an FP8 cache (bf16 q)."""
    hkv, d = 2, 16
    pb = random_paged(lens, hkv, d, block_size, torch.float32)
    q = torch.randn(len(lens), hkv * group, d)
    sinks = torch.randn(hkv * group) * 3 if with_sinks else None
    k_cache, v_cache, k_dense, v_dense, scales, tol = pb.k_cache, pb.v_cache, pb.k_dense, \
        pb.v_dense, (None, None), 1e-5
    if fp8_scale is not None:  # the cache as stored (x / scale), the oracle on what it means
        scales = (torch.rand(fp8_scale) + 0.5, torch.rand(fp8_scale) + 0.5)
        k_cache, v_cache = (reference.quantize_fp8(c.view(-1, hkv, d), s, torch.float8_e4m3fn)
                            .view(c.shape) for c, s in zip((pb.k_cache, pb.v_cache), scales))
        k_dense, v_dense = ([fp8_meaning(reference.quantize_fp8(x, s, k_cache.dtype), s)
                             for x in xs] for xs, s in zip((pb.k_dense, pb.v_dense), scales))
        q, tol = q.to(torch.bfloat16), 1.6e-2
    out, lse = attn_ops.decode_with_lse(q, k_cache, v_cache, torch.tensor(lens, dtype=torch.int32),
                                        pb.block_table, 0.25, window, softcap, sinks, *scales,
                                        backend="reference")
    for b in range(len(lens)):
        want, want_lse = attention_f64(q[b:b + 1], k_dense[b], v_dense[b], 0.25, True, window,
                                       softcap, sinks, return_lse=True)
        assert_close(out[b], want[0], tol, tol)
        assert_close(lse[b], want_lse[0], 1e-5, 1e-5, "lse")


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 4), st.floats(0, 1)), min_size=1,
                max_size=4), st.sampled_from([1, 2]), st.sampled_from([0.0, 3.0]))
def test_merge_states_fuzz(seqs, group, softcap):
    """Per sequence (lk, lq, cut fraction): merging the attention over keys [0, m) and [m, lk)
    is the attention over [0, lk) (no mask; lq > lk allowed)."""
    lens_k = [n for n, _, _ in seqs]
    lens_q = [n for _, n, _ in seqs]
    cut = [int(f * n) for n, _, f in seqs]
    hkv, d = 2, 8
    q = torch.randn(sum(lens_q), hkv * group, d)
    k, v = torch.randn(sum(lens_k), hkv, d), torch.randn(sum(lens_k), hkv, d)
    starts = [sum(lens_k[:i]) for i in range(len(seqs))]
    pieces = [(torch.cat([t[s:s + m] for s, m in zip(starts, cut)]),
               torch.cat([t[s + m:s + n] for s, m, n in zip(starts, cut, lens_k)]))
              for t in (k, v)]
    rest = [n - m for n, m in zip(lens_k, cut)]
    cu_q, mq = cu_seqlens(lens_q), max(lens_q)
    parts = [attn_ops.prefill_with_lse(q, pieces[0][i], pieces[1][i], cu_q, cu_seqlens(lens),
                                       mq, max(lens), 0.3, False, None, -1, softcap,
                                       backend="reference")
             for i, lens in enumerate((cut, rest))]
    out, lse = attn_ops.merge_states(*parts[0], *parts[1], backend="reference")
    want, want_lse = prefill_f64(q, k, v, lens_q, lens_k, 0.3, False, -1, softcap,
                                 return_lse=True)
    assert_close(out, want, 2e-5, 2e-5)
    assert_close(lse, want_lse, 2e-5, 2e-5, "lse")
