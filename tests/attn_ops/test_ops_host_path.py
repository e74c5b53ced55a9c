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


class _Calls(list):
    """The recorders' ``(backend, op)`` per call, and in ``args`` what each call received."""

    def __init__(self):
        super().__init__()
        self.args = []


@pytest.fixture
def recorders(monkeypatch):
    """Two backends, "rec_a" and "rec_b", that record calls (``(name, op)``; the arguments of
    each in ``.args``) and write nothing (a poisoned out)."""
    calls = _Calls()

    def make(name):
        def prefill(q, *args, **kw):
            calls.append((name, "prefill"))
            calls.args.append((q, *args))
            return torch.full_like(q, float("nan"))

        def decode(q, *args, **kw):
            calls.append((name, "decode"))
            calls.args.append((q, *args))
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


# ---------------------------------------------------------------------------------------------
# The memo's guard: every metadata change the checks or the choice read misses the memo
# ---------------------------------------------------------------------------------------------

def _decode_args(b=2):
    q = torch.randn(b, 4, 16)
    k_cache = torch.randn(3, 4, 2, 16)
    seqlens = torch.full((b,), 5, dtype=torch.int32)
    table = torch.tensor([[0, 1]] * b, dtype=torch.int32)
    return q, k_cache, torch.randn_like(k_cache), seqlens, table, 0.25


@pytest.fixture
def decisions(monkeypatch):
    """The choices the registry makes (one per memo miss that passed the checks)."""
    made = []
    real = registry.select
    monkeypatch.setattr(registry, "select",
                        lambda cfg, choice=None: (made.append(cfg), real(cfg, choice))[1])
    return made


def test_a_stride_change_on_a_memoised_signature_is_checked_again(recorders, decisions):
    q, k_cache, v_cache, seqlens, table, scale = _decode_args()
    call = lambda *a: attn_ops.decode(*a, backend="rec_a")
    call(q, k_cache, v_cache, seqlens, table, scale)
    call(q, k_cache, v_cache, seqlens, table, scale)
    assert len(decisions) == 1  # memoised
    # Same shape and dtype, last dim not contiguous: the checks must run and refuse it.
    strided = torch.randn(3, 4, 2, 32)[..., ::2]
    assert strided.shape == k_cache.shape
    with pytest.raises(ValueError, match="k_cache.*last dim"):
        call(q, strided, v_cache, seqlens, table, scale)
    q_strided = torch.randn(2, 4, 32)[..., ::2]
    with pytest.raises(ValueError, match="q: the last dim must be contiguous"):
        call(q_strided, k_cache, v_cache, seqlens, table, scale)
    # A valid stride change (a transposed dense cache) is decided again: the config reads it.
    dense = torch.randn(3, 2, 4, 16).transpose(1, 2)
    call(q, dense, v_cache, seqlens, table, scale)
    assert len(decisions) == 2 and not decisions[1].cache_contiguous
    assert [c for _, c in recorders] == ["decode"] * 3


def test_dtype_shape_scalar_and_optional_changes_miss_the_memo(recorders, decisions):
    q, k_cache, v_cache, seqlens, table, scale = _decode_args()
    call = lambda *a, **kw: attn_ops.decode(*a, backend="rec_a", **kw)
    call(q, k_cache, v_cache, seqlens, table, scale)
    with pytest.raises(ValueError, match="seqlens_k"):
        call(q, k_cache, v_cache, seqlens.long(), table, scale)  # dtype only
    with pytest.raises(ValueError, match="seqlens_k"):
        call(q, k_cache, v_cache, seqlens[:1], table, scale)  # shape of a non-lead tensor
    with pytest.raises(ValueError, match="block_table"):
        call(q, k_cache, v_cache, seqlens, table[:, 0], scale)  # rank
    with pytest.raises(ValueError, match="v_cache"):
        call(q, k_cache, v_cache.double(), seqlens, table, scale)
    with pytest.raises(ValueError, match="scale"):
        call(q, k_cache, v_cache, seqlens, table, float("inf"))  # a scalar
    with pytest.raises(ValueError, match="window_left"):
        call(q, k_cache, v_cache, seqlens, table, scale, window_left=-2)
    with pytest.raises(ValueError, match="sinks"):
        call(q, k_cache, v_cache, seqlens, table, scale, sinks=torch.zeros(3))  # optional
    call(q, k_cache, v_cache, seqlens, table, scale, sinks=torch.zeros(4))
    assert len(decisions) == 2 and decisions[1].has_sinks
    assert [c for _, c in recorders] == ["decode"] * 2


def test_repeated_tensor_arguments_are_guarded(recorders, decisions):
    """k is v (and one cu_seqlens for q and k) is memoised as such; unrepeating them with a
    bad v is checked again."""
    q = torch.randn(6, 4, 16)
    k = torch.randn(6, 2, 16)
    cu = cu_seqlens([2, 4])
    call = lambda *a: attn_ops.prefill(*a, 4, 4, 0.25, backend="rec_a")
    call(q, k, k, cu, cu)
    call(q, k, k, cu, cu)
    assert len(decisions) == 1
    with pytest.raises(ValueError, match="v"):
        call(q, k, k[:, :1], cu, cu)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        call(q, k, k, cu, cu.long())
    call(q, k, k.clone(), cu, cu.clone())  # valid, no longer repeated: decided once more
    call(q, k, k.clone(), cu, cu.clone())
    call(q, k, k, cu, cu)  # the first entry still serves
    assert len(decisions) == 2
    assert [c for _, c in recorders] == ["prefill"] * 5


@pytest.mark.parametrize("kind", ["torch", "python"])
def test_metadata_guard_rejects_every_metadata_change(kind, monkeypatch):
    assert registry._TORCH_GUARD, "torch's C++ tensor check is unavailable: the op path is slow"
    monkeypatch.setattr(registry, "_TORCH_GUARD", kind == "torch")
    a, b = torch.randn(2, 3, 4), torch.zeros(3, dtype=torch.int32)
    guard = registry.metadata_guard((a, b))
    assert guard(a, b) and guard(torch.randn(2, 3, 4), torch.zeros(3, dtype=torch.int32))
    repeated = registry.metadata_guard((a, a))
    assert repeated(a, a)
    # The same metadata in two objects: torch's check wants the objects repeated as memoised
    # (a miss decides again: slower, never wrong); the portable one compares metadata only.
    assert repeated(a, torch.randn(2, 3, 4)) == (kind == "python")
    assert not repeated(a, torch.randn(2, 3, 5))
    for other in (torch.randn(3, 2, 4).transpose(0, 1), torch.randn(2, 3, 8)[..., ::2],
                  a.double(), torch.randn(2, 3, 5), torch.randn(2, 3), a.to("meta")):
        assert not guard(other, b), (other.shape, other.stride(), other.dtype, other.device)
    assert not guard(a, b.long()) and not guard(a, b[None])
    assert not guard(a.clone().requires_grad_(), b) or kind == "python"


def test_backend_argument_restores_the_context_after_an_error(recorders):
    q, k_cache, v_cache, seqlens, table, scale = _decode_args()
    with attn_ops.use_backend("rec_b"):
        with pytest.raises(ValueError, match="seqlens_k"):
            attn_ops.decode(q, k_cache, v_cache, seqlens[:1], table, scale, backend="rec_a")
        assert attn_ops.current_choice() == "rec_b"
        torch.ops.attn.decode(q, k_cache, v_cache, seqlens, table, scale)
    with pytest.raises(ValueError, match="unknown backend"):
        attn_ops.decode(q, k_cache, v_cache, seqlens, table, scale, backend="tritn")
    assert attn_ops.current_choice() != "tritn"
    assert recorders == [("rec_b", "decode")]


def test_an_optional_input_that_requires_grad_still_raises_on_backward():
    """The kernels test requires_grad inline, the optional tensors (sinks, FP8 scales) too."""
    q, k_cache, v_cache, seqlens, table, scale = _decode_args()
    sinks = torch.zeros(4, requires_grad=True)
    out = attn_ops.decode(q, k_cache, v_cache, seqlens, table, scale, sinks=sinks,
                          backend="reference")
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()
    cu = cu_seqlens([2, 4])
    out, lse = attn_ops.prefill_with_lse(torch.randn(6, 4, 16), torch.randn(6, 2, 16),
                                         torch.randn(6, 2, 16), cu, cu, 4, 4, 0.25,
                                         sinks=sinks, backend="reference")
    with pytest.raises(RuntimeError, match="inference-only"):
        (out.sum() + lse.sum()).backward()


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "grad"])
def test_every_grad_mode_reaches_the_chosen_backend_with_every_argument(recorders, mode):
    """inference_mode enters below the Autograd key (partial(kernel, None)), the others at it:
    each call reaches the backend the context chooses, memoised or not, with its own tensors."""
    q, k_cache, v_cache, seqlens, table, scale = _decode_args()
    seen = []
    with attn_ops.use_backend("rec_a"):
        registry.clear_cache()
        ctx = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad,
               "grad": torch.enable_grad}[mode]
        with ctx():
            for backend in ("rec_a", "rec_b", "rec_a"):
                q2 = torch.randn_like(q)
                with attn_ops.use_backend(backend):
                    out = torch.ops.attn.decode(q2, k_cache, v_cache, seqlens, table, scale)
                got = recorders.args[-1]
                seen.append(out.shape == q2.shape and torch.isnan(out).all().item()
                            and got[0] is q2 and got[1] is k_cache and got[2] is v_cache
                            and got[3] is seqlens and got[4] is table and got[5] == scale)
    assert [name for name, _ in recorders] == ["rec_a", "rec_b", "rec_a"] and all(seen)
