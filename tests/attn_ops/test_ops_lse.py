"""prefill_with_lse / decode_with_lse and sinks: the reference against the float64 loop, the
rows that see no key, opcheck, bad input at eager and trace time, compile and export."""

import pytest
import torch
from torch.library import opcheck

import attn_ops
from tests.support.helpers import (assert_close, attention_f64, cu_seqlens, prefill_f64,
                                   random_paged)

INF = float("inf")

PREFILL_CASES = [
    # lens_q, lens_k, H, Hkv, D, causal, window, softcap, sinks
    ([5], [5], 2, 2, 32, True, -1, 0.0, False),
    ([3, 13, 1], [3, 13, 4], 4, 2, 16, True, -1, 0.0, True),
    ([7, 0, 4], [9, 0, 10], 6, 3, 24, True, 3, 0.0, True),
    ([4, 6], [4, 6], 4, 4, 8, False, -1, 5.0, True),
    ([2, 5, 0], [6, 5, 3], 2, 1, 40, False, 2, 0.0, False),
]


def _prefill_inputs(lens_q, lens_k, h, hkv, d, paged, dtype=torch.float32, extra_rows=1):
    q = torch.randn(sum(lens_q) + extra_rows, h, d, dtype=dtype)
    k = torch.randn(sum(lens_k), hkv, d, dtype=dtype)
    v = torch.randn_like(k)
    if not paged:
        return q, k, v, k, v, None
    pb = random_paged(lens_k, hkv, d, 4, dtype)
    return q, pb.k_cache, pb.v_cache, torch.cat(pb.k_dense), torch.cat(pb.v_dense), pb.block_table


@pytest.mark.parametrize("lens_q,lens_k,h,hkv,d,causal,window,softcap,with_sinks", PREFILL_CASES)
@pytest.mark.parametrize("paged", [False, True])
def test_prefill_with_lse_matches_float64(lens_q, lens_k, h, hkv, d, causal, window, softcap,
                                          with_sinks, paged):
    q, kk, vv, k, v, table = _prefill_inputs(lens_q, lens_k, h, hkv, d, paged)
    sinks = torch.randn(h) * 2 if with_sinks else None
    args = (q, kk, vv, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k),
            d ** -0.5, causal, table, window, softcap, sinks)
    out, lse = attn_ops.prefill_with_lse(*args, backend="reference")
    want, want_lse = prefill_f64(q, k, v, lens_q, lens_k, d ** -0.5, causal, window, softcap,
                                 sinks, return_lse=True)
    assert_close(out, want, 1e-5, 1e-5)
    assert_close(lse, want_lse, 1e-5, 1e-5, "lse")
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    # the plain op is the same computation
    assert torch.equal(attn_ops.prefill(*args, backend="reference"), out)


@pytest.mark.parametrize("lens,h,hkv,d,bs,window,softcap,with_sinks", [
    ([5], 2, 2, 32, 16, -1, 0.0, True), ([1, 17, 0, 33], 4, 2, 16, 8, -1, 0.0, True),
    ([9, 3], 8, 1, 8, 4, 4, 20.0, True), ([6, 0], 2, 1, 24, 2, -1, 0.0, False)])
def test_decode_with_lse_matches_float64(lens, h, hkv, d, bs, window, softcap, with_sinks):
    pb = random_paged(lens, hkv, d, bs, torch.float32)
    q = torch.randn(len(lens), h, d)
    sinks = torch.randn(h) * 2 if with_sinks else None
    seqlens = torch.tensor(lens, dtype=torch.int32)
    out, lse = attn_ops.decode_with_lse(q, pb.k_cache, pb.v_cache, seqlens, pb.block_table, 0.2,
                                        window, softcap, sinks, backend="reference")
    for b in range(len(lens)):
        want, want_lse = attention_f64(q[b:b + 1], pb.k_dense[b], pb.v_dense[b], 0.2, True,
                                       window, softcap, sinks, return_lse=True)
        assert_close(out[b], want[0], 1e-5, 1e-5)
        assert_close(lse[b], want_lse[0], 1e-5, 1e-5, "lse")
        if lens[b] == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            assert (lse[b] == -INF).all()
    plain = attn_ops.decode(q, pb.k_cache, pb.v_cache, seqlens, pb.block_table, 0.2, window,
                            softcap, sinks, backend="reference")
    assert torch.equal(plain, out)


def test_a_row_that_sees_no_key_is_zero_and_minus_inf_even_with_sinks():
    """Empty sequences, rows past cu_seqlens_q[-1]: zeros and -inf; the sink is not counted."""
    q = torch.randn(5, 2, 16)
    k = torch.randn(3, 2, 16)
    cu_q, cu_k = cu_seqlens([2, 2]), cu_seqlens([0, 3])
    out, lse = attn_ops.prefill_with_lse(q, k, k, cu_q, cu_k, 2, 3, 0.25, False, None, -1, 0.0,
                                         torch.tensor([1.0, -2.0]), backend="reference")
    for rows in (slice(0, 2), slice(4, 5)):
        assert torch.equal(out[rows], torch.zeros_like(out[rows]))
        assert (lse[rows] == -INF).all()
    assert torch.isfinite(lse[2:4]).all()


def test_sinks_behave_as_a_softmax_term_with_no_value():
    """A -inf sink is no sink; a huge sink drives the output to zero; out * (1 + e^(sink - lse0))
    recovers the sink-free output (the sink only rescales each row)."""
    lens = [4, 7]
    q, k, v = torch.randn(11, 4, 16), torch.randn(11, 2, 16), torch.randn(11, 2, 16)
    cu = cu_seqlens(lens)

    def run(sinks):
        return attn_ops.prefill_with_lse(q, k, v, cu, cu, 7, 7, 0.25, True, None, -1, 0.0, sinks,
                                         backend="reference")

    base, base_lse = run(None)
    out, lse = run(torch.full((4,), -INF))
    assert_close(out, base, 1e-6, 1e-6)
    assert_close(lse, base_lse, 1e-6, 1e-6)
    out, lse = run(torch.full((4,), 80.0))
    assert out.abs().max() < 1e-20 and torch.allclose(lse, torch.full_like(lse, 80.0))
    sinks = torch.randn(4)
    out, lse = run(sinks)
    assert_close(out * (1 + torch.exp(sinks - base_lse))[..., None], base, 1e-5, 1e-5)
    assert_close(lse, torch.logaddexp(base_lse, sinks.expand_as(base_lse)), 1e-5, 1e-5)


@pytest.mark.parametrize("lens_q,lens_k,h,hkv,d,causal,window,softcap,with_sinks",
                         PREFILL_CASES[1:4])
@pytest.mark.parametrize("paged", [False, True])
def test_opcheck_prefill_with_lse(lens_q, lens_k, h, hkv, d, causal, window, softcap,
                                  with_sinks, paged):
    q, kk, vv, _, _, table = _prefill_inputs(lens_q, lens_k, h, hkv, d, paged, torch.bfloat16)
    sinks = torch.randn(h) if with_sinks else None
    args = (q, kk, vv, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k),
            d ** -0.5, causal, table, window, softcap, sinks)
    opcheck(torch.ops.attn.prefill_with_lse.default, args)
    opcheck(torch.ops.attn.prefill.default, args)


@pytest.mark.parametrize("lens,window,softcap", [([5], -1, 0.0), ([1, 17, 0], 3, 10.0)])
def test_opcheck_decode_with_lse(lens, window, softcap):
    pb = random_paged(lens, 2, 32, 8, torch.float16)
    args = (torch.randn(len(lens), 4, 32, dtype=torch.float16), pb.k_cache, pb.v_cache,
            torch.tensor(lens, dtype=torch.int32), pb.block_table, 0.2, window, softcap,
            torch.randn(4))
    opcheck(torch.ops.attn.decode_with_lse.default, args)
    opcheck(torch.ops.attn.decode.default, args)


def _decode_args(**over):
    pb = random_paged([3, 5], 2, 16, 4, torch.float32)
    args = dict(q=torch.randn(2, 4, 16), k_cache=pb.k_cache, v_cache=pb.v_cache,
                seqlens_k=torch.tensor([3, 5], dtype=torch.int32), block_table=pb.block_table,
                scale=0.1, window_left=-1, softcap=0.0, sinks=torch.randn(4))
    args.update(over)
    return list(args.values())


SINKS_BAD = [
    (dict(sinks=torch.randn(3)), r"sinks: expected shape \[4\] \(H of q\), got \[3\]"),
    (dict(sinks=torch.randn(4, 1)), r"sinks: expected a 1-D tensor of shape \[H\] = \[4\]"),
    (dict(sinks=torch.randn(4, dtype=torch.float64)), r"sinks: expected float32"),
]


@pytest.mark.parametrize("op", ["decode", "decode_with_lse"])
@pytest.mark.parametrize("over,msg", SINKS_BAD)
def test_bad_sinks_fail_in_eager_and_at_trace_time(op, over, msg):
    fn = getattr(torch.ops.attn, op).default
    with pytest.raises(ValueError, match=msg):
        fn(*_decode_args(**over))
    torch._dynamo.reset()
    with pytest.raises(Exception, match=msg):
        torch.compile(fn, backend="aot_eager", fullgraph=True)(*_decode_args(**over))


class _Attention(torch.nn.Module):
    """Two halves of each sequence's keys attended separately and merged (cascade attention)."""

    def forward(self, q, k1, v1, k2, v2, cu_q, cu_k1, cu_k2, sinks):
        o1, l1 = torch.ops.attn.prefill_with_lse(q, k1, v1, cu_q, cu_k1, 4, 6, 0.25, False, None,
                                                 -1, 0.0, sinks)
        o2, l2 = torch.ops.attn.prefill_with_lse(q, k2, v2, cu_q, cu_k2, 4, 6, 0.25, False)
        return torch.ops.attn.merge_states(o1, l1, o2, l2)


def _cascade_inputs():
    q = torch.randn(7, 4, 16)
    k1, v1 = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    k2, v2 = torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    return (q, k1, v1, k2, v2, cu_seqlens([3, 4]), cu_seqlens([2, 3]), cu_seqlens([6, 2]),
            torch.randn(4))


def test_cascade_compiles_fullgraph_and_exports():
    args = _cascade_inputs()
    model = _Attention()
    want = model(*args)
    torch._dynamo.reset()
    for backend in ("aot_eager", "inductor"):
        got = torch.compile(model, backend=backend, fullgraph=True)(*args)
        assert_close(got[0], want[0], 1e-5, 1e-5)
        assert_close(got[1], want[1], 1e-5, 1e-5)
    ep = torch.export.export(model, args)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.attn.prefill_with_lse.default) == 2
    assert torch.ops.attn.merge_states.default in targets
    ep = ep.run_decompositions()  # the ops stay opaque
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.attn.prefill_with_lse.default) == 2
    got = ep.module()(*args)
    assert_close(got[0], want[0], 1e-6, 1e-6)


def test_cascade_aoti_package_runs(tmp_path):
    """AOTInductor packages the two-output ops and their None optionals (proxy executor): the
    loaded package computes what eager does (~30 s on 2 CPU cores: the one AOTI test here)."""
    args = _cascade_inputs()
    model = _Attention()
    want = model(*args)
    path = torch._inductor.aoti_compile_and_package(torch.export.export(model, args),
                                                    package_path=str(tmp_path / "cascade.pt2"))
    got = torch._inductor.aoti_load_package(path)(*args)
    assert_close(got[0], want[0], 1e-5, 1e-5)
    assert_close(got[1], want[1], 1e-5, 1e-5, "lse")


def test_decode_with_lse_compiles_fullgraph():
    args = _decode_args()

    def f(*a):
        out, lse = torch.ops.attn.decode_with_lse(*a)
        return out + 1, lse.exp()

    want = f(*args)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(*args)
    assert_close(got[0], want[0], 1e-5, 1e-5)
    assert_close(got[1], want[1], 1e-5, 1e-5)


def test_with_lse_ops_are_inference_only():
    args = _decode_args()
    args[0].requires_grad_(True)
    out, lse = torch.ops.attn.decode_with_lse(*args)
    with pytest.raises(RuntimeError, match="inference-only"):
        lse.sum().backward()


# ---------------------------------------------------------------------------------------------
# Which backend serves what (auto falls back to the reference for what the others refuse)
# ---------------------------------------------------------------------------------------------

_CPU = torch.device("cpu")
GROWTH = {
    "sinks": attn_ops.OpConfig("decode", _CPU, torch.bfloat16, 128, 8, num_heads=32,
                               block_size=16, paged=True, has_sinks=True),
    "lse": attn_ops.OpConfig("prefill", _CPU, torch.bfloat16, 128, 8, num_heads=32,
                             with_lse=True),
    "fp8": attn_ops.OpConfig("decode", _CPU, torch.bfloat16, 128, 8, num_heads=32,
                             block_size=16, paged=True, cache_dtype=torch.float8_e4m3fn),
    "merge": attn_ops.merge_config(torch.empty(4, 32, 128, dtype=torch.bfloat16)),
}
REASONS = {  # backend -> {case: a word of its reason, or None: served}
    "reference": {"sinks": None, "lse": None, "fp8": None, "merge": None},
    "sdpa": {"sinks": "sinks", "lse": "log-sum-exp", "fp8": "float8_e4m3fn",
             "merge": "not an attention call"},
    "triton": {"sinks": None, "lse": None, "fp8": None, "merge": None},
}


@pytest.mark.parametrize("case", sorted(GROWTH))
@pytest.mark.parametrize("backend", sorted(REASONS))
def test_each_backend_says_what_it_serves(backend, case):
    if backend == "triton":
        pytest.importorskip("triton")
    got = attn_ops.explain(GROWTH[case])[backend]
    want = REASONS[backend][case]
    assert got == "ok" if want is None else want in got, got


@pytest.mark.parametrize("case,word", [("sinks", "sink logits"),
                                       ("lse", "no FlashAttention kernel fits"),  # per provider
                                       ("fp8", "q_descale"), ("merge", "not an attention")])
def test_flash_says_what_the_contract_maps_to(case, word):
    from attn_ops.backends import flash

    config = GROWTH[case].replace(device=torch.device("cuda"))
    provider, reason = flash.choose(config, (9, 0), ())  # before any provider is consulted
    assert provider is None and word in reason


def test_auto_serves_the_growth_on_the_reference_on_cpu():
    for config in GROWTH.values():
        assert attn_ops.registry.select(config, "auto").name in ("reference", "sdpa")
    assert attn_ops.registry.select(GROWTH["sinks"], "auto").name == "reference"


def test_triton_store_serves_fp8_caches():
    pytest.importorskip("triton")
    config = attn_ops.OpConfig("store_kvcache", _CPU, torch.bfloat16, 128, 8, block_size=16,
                               paged=True, slot_dtype=torch.int64,
                               cache_dtype=torch.float8_e4m3fn)
    assert attn_ops.explain(config)["triton"] == "ok"


def test_lse_keeps_isolation_and_never_hides_nan():
    """A NaN key hidden by causality reaches neither the output nor the lse of the rows that do
    not see it; the rows that see it get NaN in both (sinks or not)."""
    q, k, v = torch.randn(6, 2, 16), torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    k[4, 1, 3] = float("nan")  # key 4 of the one sequence, kv head 1
    cu = cu_seqlens([6])
    out, lse = attn_ops.prefill_with_lse(q, k, v, cu, cu, 6, 6, 0.25, True, None, -1, 0.0,
                                         torch.randn(2), backend="reference")
    assert torch.isfinite(out[:4]).all() and torch.isfinite(lse[:4]).all()
    assert torch.isnan(lse[4:, 1]).all() and torch.isnan(out[4:, 1]).all()
    assert torch.isfinite(lse[:, 0]).all()
