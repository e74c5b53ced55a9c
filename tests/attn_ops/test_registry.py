"""Backend choice: argument > context manager > ATTN_OPS_BACKEND > auto; loud explicit failures."""

import types

import pytest
import torch

import attn_ops
from attn_ops import registry
from tests.support.helpers import cu_seqlens


@pytest.fixture
def spy_backend(monkeypatch):
    """A backend named "spy" that records calls and forwards to the reference."""
    from attn_ops.backends import reference
    calls = []
    spy = types.SimpleNamespace(
        name="spy",
        supports=lambda cfg: None if cfg.dtype != torch.float16 else "no fp16 here",
        prefill=lambda *a: (calls.append("prefill"), reference.prefill(*a))[1],
        decode=lambda *a: (calls.append("decode"), reference.decode(*a))[1],
        store_kvcache=lambda *a: (calls.append("store"), reference.store_kvcache(*a))[0])
    monkeypatch.setitem(registry.BACKENDS, "spy", "spy_module")
    real_get = registry.get_backend_module
    monkeypatch.setattr(registry, "get_backend_module",
                        lambda n: spy if n == "spy" else real_get(n))
    registry.clear_cache()
    yield calls
    registry.clear_cache()


def _prefill(dtype=torch.float32, **kw):
    q = torch.randn(4, 2, 32, dtype=dtype)
    cu = cu_seqlens([4])
    return attn_ops.prefill(q, q, q, cu, cu, 4, 4, 0.1, **kw)


def test_argument_context_and_env(spy_backend, monkeypatch):
    _prefill(backend="spy")
    assert spy_backend == ["prefill"]
    with attn_ops.use_backend("spy"):
        assert attn_ops.current_choice() == "spy"
        _prefill()
        with attn_ops.use_backend("reference"):  # innermost wins
            _prefill()
    assert spy_backend == ["prefill", "prefill"]
    monkeypatch.setenv("ATTN_OPS_BACKEND", "spy")
    _prefill()
    assert spy_backend == ["prefill"] * 3
    with attn_ops.use_backend("reference"):  # context beats the environment
        _prefill()
    assert spy_backend == ["prefill"] * 3


def test_explicit_unsupported_choice_fails_loudly(spy_backend):
    with pytest.raises(attn_ops.BackendUnavailable, match=r"'spy' cannot run prefill.*no fp16 here"):
        _prefill(dtype=torch.float16, backend="spy")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"backend: unknown backend 'nope'"):
        with attn_ops.use_backend("nope"):
            pass


def test_auto_on_cpu_is_sdpa_then_reference():
    cfg = attn_ops.OpConfig("prefill", torch.device("cpu"), torch.float32, 64, 2, num_heads=4)
    assert registry.select(cfg, "auto").name == "sdpa"
    # softcap is beyond SDPA: auto falls back to the reference, an explicit choice raises
    cfg = cfg.replace(softcap=5.0)
    assert registry.select(cfg, "auto").name == "reference"
    with pytest.raises(attn_ops.BackendUnavailable, match="softcap"):
        registry.select(cfg, "sdpa")


def test_explain_gives_each_backends_own_answer():
    cfg = attn_ops.decode_config(torch.randn(2, 4, 64), torch.randn(3, 16, 2, 64))
    reasons = attn_ops.explain(cfg)
    assert list(reasons) == list(registry.BACKENDS) + ["auto"]  # every backend, then auto's
    assert reasons["auto"].startswith("sdpa (the static order for cpu devices")
    assert reasons["reference"] == "ok" and reasons["sdpa"] == "ok"
    assert reasons["triton"] == "ok"  # CPU through the interpreter (tests set TRITON_INTERPRET)
    assert "CUDA device" in reasons["flash"]
    assert "Ascend NPU" in reasons["npu"]
    # A configuration one backend refuses is refused with that backend's reason only.
    capped = attn_ops.explain(cfg.replace(softcap=5.0))
    assert "softcap" in capped["sdpa"] and capped["reference"] == "ok"


def test_dispatch_memoises_per_signature_and_choice(spy_backend):
    """One memo: the second identical call skips checks and choice; a new choice re-decides."""
    _prefill(backend="spy")
    calls = []
    real_select = registry.select
    registry_select = lambda cfg, choice=None: (calls.append(choice), real_select(cfg, choice))[1]
    import unittest.mock
    with unittest.mock.patch.object(registry, "select", registry_select):
        _prefill(backend="spy")
        assert calls == []                      # memo hit
        _prefill(backend="reference")
        assert calls == ["reference"]           # another choice: decided once
        _prefill(backend="reference")
        assert calls == ["reference"]
        registry.clear_cache()
        _prefill(backend="reference")
        assert calls == ["reference", "reference"]


def test_the_op_path_tells_the_choice_how_long_a_prefills_keys_are(spy_backend, monkeypatch):
    """The auto table keys short and long prefills apart (auto_table's ``keys`` feature): the
    config the op path decides with carries the call's max_seqlen_k bucket, and a call in the
    other bucket is decided anew (max_seqlen_k is in the memo's signature)."""
    from attn_ops import contract
    seen = []
    real_select = registry.select
    monkeypatch.setattr(registry, "select",
                        lambda cfg, choice=None: (seen.append(cfg.short_keys),
                                                  real_select(cfg, choice))[1])
    q = torch.randn(6, 2, 32)
    cu = cu_seqlens([6])
    limit = contract.SHORT_PREFILL_KEYS
    for max_k in (6, limit, limit + 1, 6):
        attn_ops.prefill(q, q, q, cu, cu, 6, max_k, 0.1, backend="spy")
    assert seen == [True, True, False]  # the repeat of the first signature: a memo hit


def test_choice_is_made_at_run_time_under_compile(spy_backend):
    """A graph compiled once follows the context it is called in (no baked-in backend)."""
    torch._dynamo.reset()
    fn = torch.compile(lambda q, cu: torch.ops.attn.prefill(q, q, q, cu, cu, 4, 4, 0.1),
                       backend="aot_eager", fullgraph=True)
    q, cu = torch.randn(4, 2, 32), cu_seqlens([4])
    fn(q, cu)
    assert spy_backend == []
    with attn_ops.use_backend("spy"):
        fn(q, cu)
    assert spy_backend == ["prefill"]


# ---------------------------------------------------------------------------------------------
# The memo's calling convention: the op's positional arguments, adapted once per signature
# ---------------------------------------------------------------------------------------------

def _keyword_backend(calls):
    """A backend without bind_args whose functions record how they were called."""
    def record(op):
        def fn(*args, **kwargs):
            calls.append((op, len(args), dict(kwargs)))
            return args[0]
        return fn
    return types.SimpleNamespace(name="kw", supports=lambda cfg: None, decode=record("decode"),
                                 prefill=record("prefill"),
                                 store_kvcache=record("store_kvcache"))


def test_bind_args_adapts_a_keyword_backend_to_the_positional_call():
    """Leading arguments positionally, the optional tensors given as keywords (both scales when
    either is), return_lse=True for the _with_lse ops: what the ops passed before the memo held
    positional functions."""
    calls = []
    module = _keyword_backend(calls)
    q, k = torch.randn(2, 4, 16), torch.randn(3, 4, 2, 16)
    s, t = torch.ones(2, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32)
    sinks, scale = torch.zeros(4), torch.ones(())
    lead = (q, k, k, s, t, 0.25, -1, 0.0)
    cases = [((None, None, None), False, {}),
             ((sinks, None, None), False, {"sinks": sinks}),
             ((None, scale, None), False, {"k_scale": scale, "v_scale": None}),
             ((sinks, scale, scale), True, {"sinks": sinks, "k_scale": scale, "v_scale": scale,
                                            "return_lse": True})]
    for optional, with_lse, expected in cases:
        calls.clear()
        cfg = attn_ops.decode_config(q, k, with_lse=with_lse)
        args = lead + optional
        fn = registry.bind_args(module, cfg, args)
        assert fn(*args) is q
        assert calls == [("decode", 8, expected)]
    # Another call of the same signature passes its own tensors, not the first call's.
    q2, sinks2 = torch.randn(2, 4, 16), torch.ones(4)
    fn = registry.bind_args(module, attn_ops.decode_config(q, k), lead + (sinks, None, None))
    calls.clear()
    assert fn(q2, *lead[1:], sinks2, None, None) is q2
    assert calls[0][2]["sinks"] is sinks2
    # merge_states: every argument is a leading one; the function itself is kept.
    merge = lambda *a: a  # noqa: E731
    module.merge_states = merge
    cfg = attn_ops.OpConfig("merge_states", torch.device("cpu"), torch.float32, 16, 4,
                            num_heads=4, with_lse=True)
    assert registry.bind_args(module, cfg, (q, q, q, q)) is merge


def test_bind_args_prefers_the_backends_own(monkeypatch):
    seen = []
    module = types.SimpleNamespace(bind_args=lambda cfg, args: seen.append(args) or "planned",
                                   bind=lambda cfg: "not this")
    q = torch.randn(2, 4, 16)
    args = (q,) * 5 + (0.25, -1, 0.0, None, None, None)
    assert registry.bind_args(module, attn_ops.decode_config(q, q.view(2, 1, 4, 16)),
                              args) == "planned"
    assert seen == [args]


def test_an_aliased_guard_checks_identity_and_the_first_objects_metadata():
    a, b = torch.randn(2, 3), torch.zeros(3, dtype=torch.int32)
    guard = registry.metadata_guard((a, b, a, b))  # k is v, cu_seqlens_q is cu_seqlens_k
    assert guard(a, b, a, b)
    a2, b2 = torch.randn(2, 3), torch.zeros(3, dtype=torch.int32)
    assert guard(a2, b2, a2, b2)  # other objects, same metadata, same repeats
    assert not guard(a, b, a2, b)  # a repeat broken: decided again
    assert not guard(a, b, a, b2)
    ad, wide = a.double(), torch.randn(2, 4)  # the repeats kept: only the metadata differs
    assert not guard(ad, b, ad, b)
    assert not guard(wide, b, wide, b)
    assert not guard(a2, b2.long(), a2, b2.long())
