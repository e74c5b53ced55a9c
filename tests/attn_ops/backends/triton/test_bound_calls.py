"""The Triton backend's per-signature functions (``bind(config)``: plan once, then allocate and
launch): the op path uses them, they write exactly what the plain kernel wrappers write, and a
new signature gets a new plan.

Interpreter tests (CI) compare bit for bit with the wrappers called with poisoned ``out``; the
bound functions' own allocations are poisoned too (``torch.empty`` patched while they bind), so
an element they leave unwritten shows as NaN. Marked ``cuda``: the same on the GPU, where the
launches go through the compiled launchers.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import attn_ops  # noqa: E402,F401  (registers torch.ops.attn)
from attn_ops import registry  # noqa: E402
from attn_ops.backends import triton as backend  # noqa: E402
from attn_ops.backends.triton import launch  # noqa: E402
from tests.support.helpers import cu_seqlens, poisoned, random_paged  # noqa: E402

_real_empty, _real_empty_like = torch.empty, torch.empty_like


def _poisoned(t):
    if t.device.type != "meta":
        t.fill_(float("nan") if t.is_floating_point() else -7)
    return t


def _poisoned_empty(*args, **kwargs):
    return _poisoned(_real_empty(*args, **kwargs))


def _poisoned_empty_like(*args, **kwargs):
    return _poisoned(_real_empty_like(*args, **kwargs))


@pytest.fixture
def poison(monkeypatch):
    """torch.empty / empty_like return NaN-filled (integers: -7) tensors; the memo starts
    empty."""
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", _poisoned_empty_like)
    registry.clear_cache()
    yield
    registry.clear_cache()


def _equal(a, b):
    assert not torch.isnan(a).any()
    assert torch.equal(a, b)


def _decode_args(device, batch=3, lens=(5, 13, 1), h=6, hkv=2, d=24, **kw):
    torch.manual_seed(batch)
    pb = random_paged(list(lens)[:batch], hkv, d, 4, torch.float32, device=device)
    q = torch.randn(batch, h, d, device=device)
    seqlens = torch.tensor(list(lens)[:batch], dtype=torch.int32, device=device)
    return (q, pb.k_cache, pb.v_cache, seqlens, pb.block_table, 0.3), kw


def _prefill_args(device, lens=(4, 9), h=6, hkv=2, d=24, pad=3):
    """A dense varlen prefill whose last ``pad`` rows belong to no sequence (padding)."""
    torch.manual_seed(len(lens))
    total = sum(lens) + pad
    q = torch.randn(total, h, d, device=device)
    k = torch.randn(total, hkv, d, device=device)
    cu = cu_seqlens(list(lens), device=device)
    return (q, k, k * 0.5, cu, cu, max(lens), max(lens), 0.3)


def _run_op(op, args, **kw):
    with attn_ops.use_backend("triton"):
        return getattr(torch.ops.attn, op)(*args, **kw)


@pytest.mark.parametrize("extras", ["plain", "sinks_lse", "window_softcap"])
def test_op_path_decode_is_the_bound_function_and_equals_the_wrapper(poison, extras):
    from attn_ops.backends.triton import decode_kernel
    args, _ = _decode_args("cpu")
    kw, op = {}, "decode"
    if extras == "sinks_lse":
        kw, op = {"sinks": torch.randn(6)}, "decode_with_lse"
    elif extras == "window_softcap":
        args = args + (4, 5.0)
    before = launch.stats["bound"]
    outs = [_run_op(op, args, **kw) for _ in range(2)]
    assert launch.stats["bound"] == before + 2
    ref_out = poisoned(args[0].shape, args[0].dtype)
    lse = poisoned(args[0].shape[:2], torch.float32) if op == "decode_with_lse" else None
    ref = decode_kernel.decode(*args, **kw, return_lse=lse is not None, out=ref_out, lse=lse)
    for out in outs:
        for a, b in zip(out if lse is not None else [out], ref if lse is not None else [ref]):
            _equal(a, b)


def test_op_path_prefill_and_store_are_bound_and_equal_the_wrappers(poison):
    from attn_ops.backends.triton import store_kernel, unified_kernel
    args = _prefill_args("cpu")
    before = launch.stats["bound"]
    out = _run_op("prefill", args)
    out2, lse = _run_op("prefill_with_lse", args)
    ref, ref_lse = unified_kernel.prefill(*args, return_lse=True, out=poisoned(
        args[0].shape, args[0].dtype), lse=poisoned(args[0].shape[:2], torch.float32))
    for a, b in ((out, ref), (out2, ref), (lse, ref_lse)):
        _equal(a, b)
    assert torch.equal(out[13:], torch.zeros_like(out[13:]))  # padding rows zeroed
    assert torch.isneginf(lse[13:]).all()  # and their lse -inf (they see no key)
    key = torch.randn(13, 2, 24)
    slots = torch.randperm(40)[:13]
    slots[[3, 7]] = -1  # padding tokens
    caches = [torch.randn(10, 4, 2, 24) for _ in range(2)]
    mine, theirs = [c.clone() for c in caches], [c.clone() for c in caches]
    _run_op("store_kvcache", (key, key * 2, *mine, slots))
    store_kernel.store_kvcache(key, key * 2, *theirs, slots)
    assert launch.stats["bound"] == before + 3
    for a, b in zip(mine, theirs):
        _equal(a, b)
    assert not torch.equal(mine[0], caches[0])


def test_the_plan_is_made_once_per_signature_and_again_for_a_new_one(poison, monkeypatch):
    """Same signature: one bind, whatever the data; another batch, or another block-table
    stride, binds again, and every output matches the wrapper (a stale plan would not)."""
    from attn_ops.backends.triton import decode_kernel
    binds = []
    real = decode_kernel.bind_decode
    monkeypatch.setattr(decode_kernel, "bind_decode",
                        lambda *a, **k: binds.append(a[0].shape) or real(*a, **k))
    wide = _decode_args("cpu")[0]
    table = wide[4]
    strided = torch.full((table.shape[0], 2 * table.shape[1]), -7, dtype=table.dtype)
    strided[:, ::2] = table
    cases = [_decode_args("cpu")[0], _decode_args("cpu")[0], _decode_args("cpu", batch=2)[0],
             wide[:4] + (strided[:, ::2],) + wide[5:]]
    for args in cases:
        _equal(_run_op("decode", args), decode_kernel.decode(*args))
    assert len(binds) == 3 and binds[1][0] == 2


@pytest.mark.parametrize("fused", [True, False])
def test_bound_decode_with_splits_equals_the_wrapper(poison, monkeypatch, fused):
    """Split-KV (partials, semaphores or the merge launch) through the bound function."""
    from attn_ops.backends.triton import decode_kernel, decode_plan
    monkeypatch.setattr(decode_plan, "_MIN_SPLIT_KEYS", 16)
    monkeypatch.setattr(decode_kernel, "FUSED_MERGE", fused)
    decode_kernel._plan.cache_clear()
    try:
        args, _ = _decode_args("cpu", batch=2, lens=(37, 50))
        assert decode_kernel._plan(2, 6, 2, 24, 4, args[4].shape[1], torch.float32,
                                   args[0].device, False, False, None, None, fused,
                                   torch.float32, True)[0] > 1
        run = decode_kernel.bind_decode(*args, return_lse=True)
        for _ in range(2):
            out, lse = run(*args, return_lse=True)
            ref, ref_lse = decode_kernel.decode(*args, return_lse=True, fused=fused)
            _equal(out, ref)
            _equal(lse, ref_lse)
    finally:
        decode_kernel._plan.cache_clear()


def test_bound_prefill_kernel_equals_the_wrapper(poison):
    """The FA2-style prefill kernel's bound function (the op path picks it for long prompts)."""
    from attn_ops.backends.triton import prefill_kernel
    args = _prefill_args("cpu")
    sinks = torch.randn(6)
    run = prefill_kernel.bind_prefill(*args, sinks=sinks, return_lse=True)
    out, lse = run(*args, sinks=sinks, return_lse=True)
    ref, ref_lse = prefill_kernel.prefill(*args, sinks=sinks, return_lse=True)
    _equal(out, ref)
    _equal(lse, ref_lse)
    assert torch.isneginf(lse[13:]).all()  # padding rows see no key


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["store_kvcache", "decode", "prefill"])
def test_bound_calls_on_the_gpu_go_direct_and_equal_the_wrappers(op, poison, monkeypatch):
    """CUDA: from the second call on the bound function launches through the compiled
    launcher (stats["direct"]), bit for bit what the wrapper writes through kernel[grid]."""
    from attn_ops.backends.triton import decode_kernel, store_kernel, unified_kernel
    outs, direct, raw = [], launch.stats["direct"], launch.stats["raw"]
    for _ in range(3):
        if op == "decode":
            args, _ = _decode_args("cuda")
            outs.append((_run_op("decode", args), lambda a=args: decode_kernel.decode(*a)))
        elif op == "prefill":
            args = _prefill_args("cuda")
            outs.append((_run_op("prefill", args), lambda a=args: unified_kernel.prefill(*a)))
        else:
            key = torch.randn(13, 2, 24, device="cuda")
            slots = torch.randperm(40, device="cuda")[:13]
            caches = [torch.randn(10, 4, 2, 24, device="cuda") for _ in range(2)]
            mine = [c.clone() for c in caches]
            _run_op("store_kvcache", (key, key, *mine, slots))
            outs.append((mine[0], lambda k=key, c=caches, s=slots: (
                store_kernel.store_kvcache(k, k, *c, s), c[0])[1]))
    assert launch.stats["direct"] > direct
    assert launch.stats["raw"] > raw, "Triton 3.6's launcher: called below its Python wrapper"
    monkeypatch.setattr(launch, "enabled", False)
    for mine, plain in outs:
        _equal(mine, plain())


@pytest.mark.parametrize("paged", [False, True])
def test_the_op_path_picks_the_kernel_the_wrapper_picks(monkeypatch, paged):
    # a long dense prompt is the FA2-style prefill kernel's, as in backend.prefill; the bound
    # path once read window_left as the block table, took every dense call for paged and sent
    # 4 x 4096 to the unified kernel (347 vs 414 TFLOP/s on the H200)
    from attn_ops.backends.triton import prefill_kernel, unified_launch
    chosen = []
    for module in (prefill_kernel, unified_launch):
        monkeypatch.setattr(module, "bind_prefill",
                            lambda *a, _m=module.__name__, **k: chosen.append(_m) or
                            (lambda *a, **k: None))
    lens, h, hkv, d = [1100, 1100], 4, 2, 16
    q = torch.randn(sum(lens), h, d)
    if paged:
        batch = random_paged(lens, hkv, d, 16, torch.float32)
        k, v, table = batch.k_cache, batch.v_cache, batch.block_table
    else:
        k = v = torch.randn(sum(lens), hkv, d)
        table = None
    cu = cu_seqlens(lens)
    args = (q, k, v, cu, cu, 1100, 1100, 0.25, True, table, -1, 0.0)
    fn = backend.bind(attn_ops.prefill_config(q, k, True, table, v=v))
    fn(*args)
    want = backend.use_unified_prefill(1100, q.shape[0], 2, h // hkv)
    assert chosen == ["attn_ops.backends.triton." + ("unified_launch" if want else
                                                      "prefill_kernel")]


@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_a_q_with_other_strides_gets_a_contiguous_output(poison, op):
    """The bound functions allocate out as empty_like(q) only when q has a fresh contiguous
    output's strides; a q with padded rows or heads-major (other signatures) gets a contiguous
    out too, and every one equals the wrapper."""
    from attn_ops.backends.triton import decode_kernel, unified_kernel
    if op == "decode":
        args, _ = _decode_args("cpu")
        wrapper = decode_kernel.decode
    else:
        args = _prefill_args("cpu")
        wrapper = unified_kernel.prefill
    q = args[0]
    padded = torch.randn(q.shape[0], q.shape[1] + 2, q.shape[2])[:, 1:-1]
    padded.copy_(q)
    # dense but heads-major: empty_like would keep these strides, the kernel writes row-major
    permuted = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert len({padded.stride(), permuted.stride(), q.stride()}) == 3
    for query in (q, padded, permuted, q):
        out = _run_op(op, (query,) + args[1:])
        assert out.is_contiguous() and out.shape == q.shape
        _equal(out, wrapper(*args))


@pytest.mark.parametrize("op", ["decode", "prefill", "prefill_kernel", "store_kvcache"])
def test_the_bound_function_routes_calls_under_a_dispatch_mode_to_the_wrapper(monkeypatch, op):
    """bind_args' function: a plain call launches the plan; a call under a dispatch mode
    (tracing) goes to the plain wrapper, which decides (wrap_triton when traced)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from attn_ops.backends.triton import decode_kernel, prefill_kernel, store_kernel
    from attn_ops.backends.triton import unified_kernel

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    wrapped = []
    if op == "decode":
        args, _ = _decode_args("cpu")
        args = args + (-1, 0.0, None, None, None)
        cfg = attn_ops.decode_config(args[0], args[1])
        module, name = decode_kernel, "decode"
    elif op == "store_kvcache":
        key = torch.randn(5, 2, 24)
        args = (key, key, torch.randn(10, 4, 2, 24), torch.randn(10, 4, 2, 24),
                torch.arange(5) * 3, None, None)
        cfg = attn_ops.store_config(key, args[2], args[4])
        module, name = backend, "store_kvcache"
    else:
        args = _prefill_args("cpu") + (True, None, -1, 0.0, None, None, None)
        if op == "prefill_kernel":
            monkeypatch.setattr(backend, "use_unified_prefill", lambda *a: False)
        cfg = attn_ops.prefill_config(args[0], args[1])
        module = prefill_kernel if op == "prefill_kernel" else unified_kernel
        name = "prefill"
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: wrapped.append(1) or real(*a, **k))
    fn = backend.bind_args(cfg, args)
    before = launch.stats["bound"]
    first = fn(*args)
    assert wrapped == [] and launch.stats["bound"] == before + 1
    with Passthrough():
        second = fn(*args)
    assert wrapped == [1] and launch.stats["bound"] == before + 1
    if op != "store_kvcache":
        _equal(second, first)


def test_a_choice_change_between_calls_of_one_signature_is_followed(poison):
    """The memo keys on the choice: triton, reference, triton again on one signature; each
    call runs the chosen backend (the bound count moves on the Triton calls only)."""
    from attn_ops.backends import reference
    args, _ = _decode_args("cpu")
    ref = reference.decode(*args)
    for choice, bound in (("triton", 1), ("reference", 0), ("triton", 1), ("auto", 0)):
        before = launch.stats["bound"]
        with attn_ops.use_backend(choice):
            out = torch.ops.attn.decode(*args)
        assert launch.stats["bound"] == before + bound, choice
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_a_scalar_change_rebinds(poison, monkeypatch):
    """window_left / softcap / scale are part of the signature: a change plans again, and the
    new plan computes the new call (a stale one would keep the old scale or window)."""
    from attn_ops.backends.triton import decode_kernel
    binds = []
    real = decode_kernel.bind_decode
    monkeypatch.setattr(decode_kernel, "bind_decode",
                        lambda *a, **k: binds.append(a[5:8]) or real(*a, **k))
    args, _ = _decode_args("cpu")
    for extra in ((0.3, -1, 0.0), (0.3, -1, 0.0), (0.5, -1, 0.0), (0.3, 3, 0.0), (0.3, 3, 4.0)):
        call = args[:5] + extra
        _equal(_run_op("decode", call), decode_kernel.decode(*call))
    assert binds == [(0.3, -1, 0.0), (0.5, -1, 0.0), (0.3, 3, 0.0), (0.3, 3, 4.0)]
