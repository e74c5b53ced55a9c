"""The eager op path's shortcuts keep its guarantees.

The path memoises checks and choice per call signature, reads the environment through
attn_ops.env and, under Autograd, calls the kernel directly for plain tensors. None of that may
change what a call does: a failed call is never memoised, ATTN_OPS_CHECK, ATTN_OPS_BACKEND and
use_backend are followed on every call, fake tensors and inputs that require grad still take the
full dispatcher path.
"""

import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import attn_ops
from attn_ops import ops, registry
from tests.support.helpers import cu_seqlens


@pytest.fixture
def recorders(monkeypatch):
    """Two backends, "rec_a" and "rec_b", that record calls and write nothing (a poisoned out)."""
    calls = []

    def make(name):
        def prefill(q, *args, **kw):
            calls.append((name, "prefill"))
            return torch.full_like(q, float("nan"))

        def decode(q, *args, **kw):
            calls.append((name, "decode"))
            return torch.full_like(q, float("nan"))

        def store_kvcache(*args, **kw):
            calls.append((name, "store"))

        return types.SimpleNamespace(name=name, supports=lambda cfg: None, prefill=prefill,
                                     decode=decode, store_kvcache=store_kvcache)

    fakes = {"rec_a": make("rec_a"), "rec_b": make("rec_b")}
    for name in fakes:
        monkeypatch.setitem(registry.BACKENDS, name, f"{name}_module")
    real_get = registry.get_backend_module
    monkeypatch.setattr(registry, "get_backend_module", lambda n: fakes.get(n) or real_get(n))
    registry.clear_cache()
    yield calls
    registry.clear_cache()


def _store_args(t=5, slot=7):
    k_cache = torch.randn(3, 4, 2, 16)
    key = torch.randn(t, 2, 16)
    slots = torch.arange(t) + slot
    return key, key.clone(), k_cache, torch.randn_like(k_cache), slots


def test_failed_calls_are_never_memoised(recorders):
    key, value, k_cache, v_cache, slots = _store_args()
    bad_value = value[:, :1]  # Hkv 1 instead of 2
    for _ in range(2):
        before = len(registry._memo)
        with pytest.raises(ValueError, match="value"):
            attn_ops.store_kvcache(key, bad_value, k_cache, v_cache, slots, backend="rec_a")
        assert len(registry._memo) == before
    assert recorders == []


def test_data_check_toggle_is_followed_on_a_memoised_signature(recorders, monkeypatch):
    key, value, k_cache, v_cache, slots = _store_args()
    slots_oob = slots + 100  # past the 12 slots of the cache; same metadata as slots
    monkeypatch.setenv("ATTN_OPS_CHECK", "1")
    attn_ops.store_kvcache(key, value, k_cache, v_cache, slots, backend="rec_a")  # memoised
    with pytest.raises(ValueError, match="slot"):
        attn_ops.store_kvcache(key, value, k_cache, v_cache, slots_oob, backend="rec_a")
    monkeypatch.setenv("ATTN_OPS_CHECK", "0")
    attn_ops.store_kvcache(key, value, k_cache, v_cache, slots_oob, backend="rec_a")
    monkeypatch.delenv("ATTN_OPS_CHECK")
    attn_ops.store_kvcache(key, value, k_cache, v_cache, slots_oob, backend="rec_a")
    monkeypatch.setenv("ATTN_OPS_CHECK", "1")
    with pytest.raises(ValueError, match="slot"):
        attn_ops.store_kvcache(key, value, k_cache, v_cache, slots_oob, backend="rec_a")
    assert recorders == [("rec_a", "store")] * 3


def test_choice_is_followed_call_by_call(recorders, monkeypatch):
    q = torch.randn(6, 4, 16)
    k = torch.randn(6, 2, 16)
    cu = cu_seqlens([2, 4])
    call = lambda: torch.ops.attn.prefill(q, k, k, cu, cu, 4, 4, 0.25)
    monkeypatch.setenv("ATTN_OPS_BACKEND", "rec_a")
    call()
    with attn_ops.use_backend("rec_b"):
        call()
        with attn_ops.use_backend(None):  # back to the environment's choice
            call()
        call()
    monkeypatch.setenv("ATTN_OPS_BACKEND", "rec_b")
    call()
    attn_ops.prefill(q, k, k, cu, cu, 4, 4, 0.25, backend="rec_a")
    call()
    assert [name for name, _ in recorders] == ["rec_a", "rec_b", "rec_a", "rec_b", "rec_b",
                                               "rec_a", "rec_b"]
    with pytest.raises(ValueError, match="unknown backend"):
        attn_ops.use_backend("tritn")


def test_inputs_that_require_grad_still_raise_on_backward():
    q = torch.randn(6, 4, 16, requires_grad=True)
    k = torch.randn(6, 2, 16)
    cu = cu_seqlens([2, 4])
    out = attn_ops.prefill(q, k, k, cu, cu, 4, 4, 0.25, backend="reference")
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()
    with torch.no_grad():  # no node needed: the direct path
        assert attn_ops.prefill(q, k, k, cu, cu, 4, 4, 0.25, backend="reference").grad_fn is None


def test_fake_tensors_take_the_fake_kernel(recorders):
    """Under FakeTensorMode the Autograd kernel must redispatch (Python key), never call the
    real kernel with fake tensors: the recording backends would see the call."""
    with FakeTensorMode():
        q = torch.empty(6, 4, 16)
        k = torch.empty(6, 2, 16)
        cu = torch.empty(3, dtype=torch.int32)
        out = torch.ops.attn.prefill(q, k, k, cu, cu, 4, 4, 0.25)
        assert out.shape == q.shape
        out = attn_ops.decode(q[:2], k.view(3, 2, 2, 16), k.view(3, 2, 2, 16),
                              torch.empty(2, dtype=torch.int32),
                              torch.empty(2, 2, dtype=torch.int32), 0.25, backend="rec_a")
        assert out.shape == (2, 4, 16)
    assert recorders == []
    # The keysets seen so far: a plain CPU call goes direct, a fake one does not.
    assert not ops._runs_directly(torch._C._dispatch_keys(
        FakeTensorMode().from_tensor(torch.empty(1))))
    assert ops._runs_directly(torch._C._dispatch_keys(torch.empty(1)))
