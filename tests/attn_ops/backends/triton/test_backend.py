"""The Triton backend package (attn_ops/backends/triton/__init__.py): supports(), lazy import,
and the ops end to end under torch.compile / CUDA graphs (``cuda``-marked tests need a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import attn_ops
from attn_ops import registry
from attn_ops.backends import reference
from attn_ops.backends import triton as tb
from attn_ops.contract import OpConfig
from tests.support.helpers import TOLERANCES, assert_close, cu_seqlens, random_paged

BF16 = torch.bfloat16
DEV = "cuda"

# ---------------------------------------------------------------------------------------------
# supports() and lazy import
# ---------------------------------------------------------------------------------------------

def _config(op, **over):
    cfg = OpConfig(op, torch.device("cuda"), torch.bfloat16, 128, 8, num_heads=32, paged=True,
                   block_size=16)
    return cfg.replace(**over)


def test_supports_reasons(monkeypatch):
    assert tb.supports(_config("prefill")) is None
    assert tb.supports(_config("decode", head_dim=96, block_size=24)) is None
    assert tb.supports(_config("store_kvcache", device=torch.device("cpu"))) is None
    assert "int8" in tb.supports(_config("decode", dtype=torch.int8))
    assert "head dim 512" in tb.supports(_config("prefill", head_dim=512))
    assert "'mps'" in tb.supports(_config("decode", device=torch.device("mps")))
    assert "block size 0" in tb.supports(_config("decode", block_size=0))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in tb.supports(_config("decode", device=torch.device("cpu")))


@pytest.mark.parametrize("op", ["prefill", "decode"])
def test_supports_sinks_lse_fp8(op):
    # every kernel the backend routes to serves them; FP8 is read by fp16/bf16 queries only
    fp8 = torch.float8_e4m3fn
    for dtype in (torch.bfloat16, torch.float16):
        cfg = _config(op, dtype=dtype, has_sinks=True, with_lse=True, cache_dtype=fp8)
        assert tb.supports(cfg) is None
        assert tb.supports(cfg.replace(paged=False, block_size=None) if op == "prefill"
                           else cfg) is None
    reason = tb.supports(_config(op, dtype=torch.float32, cache_dtype=fp8))
    assert "float16/bfloat16" in reason and "float32" in reason
    assert tb.supports(_config(op, dtype=torch.float32, has_sinks=True, with_lse=True)) is None
    assert tb.supports(_config("store_kvcache", dtype=torch.float32, cache_dtype=fp8)) is None


def test_prefill_kernel_choice_is_static():
    # few rows or short prompts -> unified kernel; long uniform prompts -> FA2-style kernel;
    # a batch with far fewer tokens than B * max_seqlen_q (decode rows + chunks) -> unified
    assert tb.use_unified_prefill(4, 256, 64, 4)
    assert tb.use_unified_prefill(256, 16384, 64, 4)
    assert not tb.use_unified_prefill(4096, 16384, 4, 4)
    assert tb.use_unified_prefill(4096, 1104, 58, 4)


def _route(q_shape=(4 * 512, 32, 128), k_heads=8, seqs=4, max_q=512, dtype=torch.bfloat16,
           k=None, **kwargs):
    q = torch.empty(q_shape, dtype=dtype, device="meta")
    if k is None:
        k = torch.empty(q_shape[0], k_heads, q_shape[2], dtype=dtype, device="meta")
    cu = torch.empty(seqs + 1, dtype=torch.int32, device="meta")
    return tb.prefill_route(q, k, cu, max_q, **kwargs)


def test_prefill_route_takes_the_hopper_kernel_where_it_serves(monkeypatch):
    from attn_ops.backends.triton import hopper_prefill_launch as hopper
    # off sm90 (here: meta tensors, no GPU) the route is the static rule's
    assert _route() == "unified" and _route(max_q=2048, q_shape=(4 * 2048, 32, 128)) == "prefill"
    from attn_ops.backends.triton import common
    monkeypatch.setattr(hopper, "available", lambda device: True)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: torch.device("cuda")))
    monkeypatch.setattr(common, "device_sm_count", lambda device: 132)
    assert _route() == "hopper"  # uniform 4 x 512 prompts
    # few rows: the Gluon kernel's packed form past 16 rows per sequence where it has about an
    # item per SM (16 x 32 / 4 = 128 items of 4 heads), else the unified kernel's small path
    assert _route(q_shape=(128, 32, 128), seqs=16, max_q=8) == "hopper"
    assert _route(q_shape=(64, 32, 128), seqs=16, max_q=4) == "unified"  # 16 rows
    assert _route(q_shape=(64, 32, 128), seqs=8, max_q=8) == "unified"
    assert _route(q_shape=(128, 32, 128), k_heads=32, seqs=16, max_q=8) == "unified"  # G = 1
    assert _route(q_shape=(128, 32, 128), seqs=16, max_q=8, softcap=30.0) == "unified"
    # far shorter than B * max_seqlen_q: decode rows + chunks, prompts of mixed lengths
    assert _route(q_shape=(1104, 32, 128), seqs=58, max_q=512) == "split"
    assert _route(q_shape=(19200, 32, 128), seqs=96, max_q=400) == "split"
    # ... but only where keys reach past the queries (a prefix: decode rows, chunks); prompts
    # of mixed lengths with no prefix take the Gluon kernel alone (measured faster on the H200)
    assert _route(q_shape=(1104, 32, 128), seqs=58, max_q=512, max_seqlen_k=4608) == "split"
    assert _route(q_shape=(19200, 32, 128), seqs=96, max_q=400, max_seqlen_k=400) == "hopper"
    assert _route(q_shape=(3072, 32, 128), seqs=64, max_q=100, max_seqlen_k=100) == "hopper"
    assert _route(q_shape=(1600, 32, 128), seqs=4, max_q=500) == "hopper"  # 80% full
    assert _route(dtype=torch.float32) == "unified"  # what the Gluon kernel refuses
    assert _route(q_shape=(2048, 32, 96)) == "unified"
    table = torch.empty(4, 40, dtype=torch.int32, device="meta")
    for page in (16, 64, 128, 256):  # a paged prefix: pages TMA copies whole into its tiles
        cache = torch.empty(200, page, 8, 128, dtype=torch.bfloat16, device="meta")
        assert _route(k=cache, block_table=table) == "hopper", page
    pair = torch.empty(200, 2, 16, 8, 128, dtype=torch.bfloat16, device="meta")
    for cache in (torch.empty(200, 8, 8, 128, dtype=torch.bfloat16, device="meta"),  # 8-row pages
                  torch.empty(200, 48, 8, 128, dtype=torch.bfloat16, device="meta"),
                  pair[:, 0]):  # K and V pages interleaved: not one row matrix
        assert _route(k=cache, block_table=table) != "hopper", cache.shape
    for kwargs in (dict(window_left=8), dict(softcap=30.0)):
        assert _route(**kwargs) != "hopper", kwargs
    # sinks and the lse: the rows' finish, which the Gluon kernel serves (split route too)
    sinks = torch.empty(32, device="meta")
    for kwargs in (dict(sinks=sinks), dict(return_lse=True), dict(sinks=sinks, return_lse=True)):
        assert _route(**kwargs) == "hopper", kwargs
        assert _route(q_shape=(1104, 32, 128), seqs=58, max_q=512, **kwargs) == "split"
    monkeypatch.setattr(tb, "HOPPER_PREFILL", False)
    assert _route() == "unified"


def test_few_query_paged_prefill_through_the_op():
    lens_q, lens_k = [4, 1, 0, 3], [40, 17, 0, 9]
    paged = random_paged(lens_k, 2, 32, 16, torch.float16)
    q = torch.randn(8, 4, 32, dtype=torch.float16)
    args = (q, paged.k_cache, paged.v_cache, cu_seqlens(lens_q), cu_seqlens(lens_k), 4, 40, 0.2,
            True, paged.block_table)
    got = attn_ops.prefill(*args, backend="triton")
    assert_close(got, attn_ops.prefill(*args, backend="reference"), *TOLERANCES[torch.float16])


def test_importing_the_backend_imports_no_triton():
    code = ("import sys, attn_ops, attn_ops.backends.triton as t; "
            "assert 'triton' not in sys.modules, 'triton imported'; print(t.name)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "triton"


# ---------------------------------------------------------------------------------------------
# graph capture by torch.compile (the op stays one opaque call; the backend runs inside it)
# ---------------------------------------------------------------------------------------------

def test_compiled_store_then_decode_runs_triton_backend():
    torch._dynamo.reset()
    lens = [9, 20]
    paged = random_paged(lens, 2, 32, 16, torch.float16)
    q = torch.randn(2, 4, 32, dtype=torch.float16)
    new_k = torch.randn(2, 2, 32, dtype=torch.float16)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    flat = paged.block_table.long() * 16
    slots = torch.stack([flat[0, 0] + 8, flat[1, 1] + 3])  # the last token of each sequence

    def step(q, new_k, k_cache, v_cache, slots, seqlens, table):
        attn_ops.store_kvcache(new_k, new_k, k_cache, v_cache, slots)
        return attn_ops.decode(q, k_cache, v_cache, seqlens, table, 0.25)

    caches_ref = paged.k_cache.clone(), paged.v_cache.clone()
    expected = step(q, new_k, *caches_ref, slots, seqlens, paged.block_table)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with registry.use_backend("triton"):
        got = compiled(q, new_k, paged.k_cache, paged.v_cache, slots, seqlens, paged.block_table)
    assert torch.equal(paged.k_cache, caches_ref[0])
    assert_close(got, expected, *TOLERANCES[torch.float16])

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


@pytest.mark.cuda
@pytest.mark.parametrize("page,width", [(16, 64), (256, 4)])
def test_cuda_graph_store_decode_replays_with_new_lengths_cuda(page, width):
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


@pytest.mark.cuda
def test_wrappers_never_sync_the_host_cuda(monkeypatch):
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


@pytest.mark.cuda
def test_inductor_compiled_prefill_and_decode_cuda():
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


@pytest.mark.parametrize("bound", [True, False])
def test_bound_prefill_on_the_hopper_route_routes_once(monkeypatch, bound):
    # The route is decided when the signature is planned; each call then goes straight to the
    # guarded Hopper entry bound to that signature: the entry itself where it takes the op's
    # arguments and routes traced calls (``routes_traced``: no frame between), else through a
    # function that passes prefill's leading arguments.
    from attn_ops.backends.triton import hopper_prefill_launch as hopper
    routes, calls = [], []

    def entry(*a, out=None, lse=None, sinks=None):
        calls.append(a + (out,))
        return a[0]
    if bound:
        entry.routes_traced = True
    monkeypatch.setattr(tb, "prefill_route", lambda *a, **kw: routes.append(1) or "hopper")
    monkeypatch.setattr(hopper, "bind_prefill_guarded", lambda *s, **kw: entry)
    q, k = torch.randn(20, 4, 32), torch.randn(20, 2, 32)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    args = (q, k, k, cu, cu, 13, 13, 0.2, True, None, -1, 0.0, None, None, None, False)
    monkeypatch.setattr(tb, "_HOPPER_EAGER_MIN_WORK", 0)  # this tiny call counts as large
    run = tb._bind_prefill(*args)
    assert (run is entry) is bound
    assert run(*args) is q and run(*args) is q
    tail = (args[10:] if bound else ()) + (None,)  # the rest as given, out last
    assert len(routes) == 1 and [c[5:] for c in calls] == [(13, 13, 0.2, True, None) + tail] * 2


def test_the_hopper_route_sends_traced_calls_to_the_wrapper(monkeypatch):
    # The memo calls the route's planned function directly (routes_traced), so the function
    # itself sends a call under a dispatch mode (tracing) to the wrapper, all arguments on.
    from torch.utils._python_dispatch import TorchDispatchMode

    from attn_ops.backends.triton import hopper_prefill_launch as hopper

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
    calls, wrapped = [], []
    monkeypatch.setattr(tb, "prefill_route", lambda *a, **kw: "hopper")
    # an entry that leaves traced calls to its caller: the route's function sends them on
    monkeypatch.setattr(hopper, "bind_prefill_guarded",
                        lambda *s, **kw: lambda *a, **k: calls.append(a) or a[0])
    monkeypatch.setattr(tb, "prefill", lambda *a: wrapped.append(a) or a[1])
    monkeypatch.setattr(tb, "_HOPPER_EAGER_MIN_WORK", 0)
    q, k = torch.randn(20, 4, 32), torch.randn(20, 2, 32)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    args = (q, k, k, cu, cu, 13, 13, 0.2, True, None, -1, 0.0, None, None, None, False)
    run = tb._bind_prefill(*args)
    assert run.routes_traced
    with Passthrough():
        assert run(*args) is k
    assert wrapped == [args] and not calls
    assert run(*args) is q and len(calls) == 1


@pytest.mark.parametrize("capturing", [False, True])
def test_a_small_eager_call_on_the_hopper_route_takes_the_bound_kernel(monkeypatch, capturing):
    # Below the work threshold an eager call would spend more host time on the Hopper route's
    # launches than the kernel runs: it takes the other route's bound kernel (same result); a
    # call being captured into a CUDA graph still takes the Hopper entry.
    from attn_ops.backends.triton import hopper_prefill_launch as hopper
    calls = []
    monkeypatch.setattr(tb, "prefill_route", lambda *a, **kw: "hopper")
    monkeypatch.setattr(tb, "_capturing", lambda: capturing)
    monkeypatch.setattr(hopper, "bind_prefill_guarded",
                        lambda *s, **kw: lambda *a, **k: calls.append(a) or a[0])
    q, k, v = torch.randn(20, 4, 32), torch.randn(20, 2, 32), torch.randn(20, 2, 32)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    args = (q, k, v, cu, cu, 13, 13, 0.2, True, None, -1, 0.0, None, None, None, False)
    out = tb._bind_prefill(*args)(*args)
    if capturing:
        assert out is q and len(calls) == 1
    else:
        assert not calls
        assert_close(out, reference.prefill(q, k, v, cu, cu, 13, 13, 0.2, True),
                     *TOLERANCES[torch.float32])


# --- the split route: the unified kernel's small path, then the Gluon kernel past min_q -------

def _mixed_batch(dtype=torch.float32):
    """Decode rows (1 query), speculative rows (4) and two chunks over a paged cache; G = 4."""
    lens_q = [1, 4, 1, 9, 4, 13]
    lens_k = [n + p for n, p in zip(lens_q, [20, 7, 33, 16, 0, 21])]
    paged = random_paged(lens_k, 2, 32, 16, dtype)
    q = torch.randn(sum(lens_q), 8, 32, dtype=dtype)
    return (q, paged.k_cache, paged.v_cache, cu_seqlens(lens_q), cu_seqlens(lens_k),
            max(lens_q), max(lens_k), 0.3, True, paged.block_table), lens_q


def test_the_split_routes_small_path_writes_exactly_the_short_sequences():
    from attn_ops.backends.triton import unified_kernel
    from tests.support.helpers import poisoned
    args, lens_q = _mixed_batch()
    q = args[0]
    out = poisoned(q.shape, q.dtype)
    unified_kernel.prefill(*args, config=tb._split_config(q), out=out)
    expected = reference.prefill(*args)
    min_q = tb._split_min_q(q, args[1], args[9])
    assert min_q == 4  # 16 packed rows at G = 4
    starts = [0] + torch.tensor(lens_q).cumsum(0).tolist()
    for b, n in enumerate(lens_q):
        rows = slice(starts[b], starts[b + 1])
        if n <= min_q:
            assert_close(out[rows], expected[rows], *TOLERANCES[torch.float32])
        else:
            assert torch.isnan(out[rows]).all(), f"sequence {b} ({n} queries) is the other's"


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "sinks-lse"])
@pytest.mark.parametrize("bound", [False, True])
def test_the_split_route_hands_its_output_to_the_hopper_entry(monkeypatch, bound, extras):
    """Routed "split", a call runs the small path, then the guarded Gluon entry on the same
    output (and lse) with min_q and the call's sinks (stand-in: the reference writes the
    sequences past min_q)."""
    from attn_ops.backends.triton import hopper_prefill_launch as hopper
    args, lens_q = _mixed_batch()
    sinks = torch.randn(args[0].shape[1]) if extras else None
    seen = []

    def guarded(q, k, v, cq, ck, mq, mk, scale, causal, table, out, min_q, sinks=None,
                return_lse=False, lse=None):
        seen.append((min_q, sinks))
        full, full_lse = reference.prefill(q, k, v, cq, ck, mq, mk, scale, causal, table,
                                           sinks=sinks, return_lse=True)
        for b in range(len(lens_q)):
            lo, hi = int(cq[b]), int(cq[b + 1])
            if hi - lo > min_q:
                out[lo:hi] = full[lo:hi]
                if return_lse:
                    lse[lo:hi] = full_lse[lo:hi]
        return (out, lse) if return_lse else out
    monkeypatch.setattr(tb, "prefill_route", lambda *a, **kw: "split")
    monkeypatch.setattr(tb, "_HOPPER_EAGER_MIN_WORK", 0)
    full = args + (-1, 0.0, sinks, None, None, extras)
    if bound:
        monkeypatch.setattr(hopper, "bind_prefill_guarded", lambda *s, **kw: (
            lambda *a, out=None, lse=None, sinks=None: guarded(
                *a[:10], out, s[10], sinks, kw["return_lse"], lse)))
        got = tb._bind_prefill(*full)(*full)
    else:
        monkeypatch.setattr(hopper, "prefill_guarded", guarded)
        got = tb.prefill(*full)
    assert seen == [(4, sinks)]
    expected = reference.prefill(*args, sinks=sinks, return_lse=extras)
    if extras:
        assert_close(got[1], expected[1], *TOLERANCES[torch.float32], what="lse")
        got, expected = got[0], expected[0]
    assert_close(got, expected, *TOLERANCES[torch.float32])


@pytest.mark.cuda
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "sinks-lse"])
@pytest.mark.parametrize("path", ["op", "wrapper"])
def test_a_mixed_batch_takes_the_split_route_on_sm90(path, extras):
    """Decode rows, speculative rows and two chunks over a paged prefix in one call: on an sm90
    GPU the split route (unified small path + Gluon kernel), against the reference; with sinks
    and the lse (prefill_with_lse), each kernel writes its rows' lse."""
    from attn_ops.backends.triton import hopper_prefill_launch as hopper
    if not hopper.available():
        pytest.skip("needs an sm90 GPU and Gluon's Hopper API")
    torch.manual_seed(1)
    dev, dtype = "cuda", torch.bfloat16
    lens_q = [1] * 5 + [4] * 3 + [300, 129]
    lens_k = [700, 33, 900, 1, 64] + [200, 17, 1000] + [1300, 129]
    paged = random_paged(lens_k, 8, 128, 16, dtype, dev)
    q = torch.randn(sum(lens_q), 32, 128, device=dev).to(dtype)
    args = (q, paged.k_cache, paged.v_cache, cu_seqlens(lens_q, dev), cu_seqlens(lens_k, dev),
            max(lens_q), max(lens_k), 128 ** -0.5, True, paged.block_table)
    sinks = torch.randn(32, device=dev) * 2 if extras else None
    assert tb.prefill_route(q, paged.k_cache, args[3], args[5], True, args[9], sinks=sinks,
                            return_lse=extras) == "split"
    expected = reference.prefill(*args, sinks=sinks, return_lse=extras)
    if path == "op":
        op = attn_ops.prefill_with_lse if extras else attn_ops.prefill
        more = (-1, 0.0, sinks) if extras else ()
        got = op(*args, *more, backend="triton")
        got = op(*args, *more, backend="triton")  # the bound call, planned above
    else:
        got = tb.prefill(*args, sinks=sinks, return_lse=extras)
    if extras:
        assert_close(got[1], expected[1], 2e-3, 1e-3, what="lse")
        got, expected = got[0], expected[0]
    assert_close(got, expected, *TOLERANCES[dtype])
