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
