"""The attn custom ops: schemas, fake kernels and the dispatching kernels, together.

All schemas of the library are defined here, each with its fake kernel beside it. Positional order
is the public contract (see docs/DESIGN.md); trailing optionals may grow.

* ``store_kvcache(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> ()``
* ``prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal=True,
  block_table=None, window_left=-1, softcap=0.0, sinks=None, k_scale=None, v_scale=None)
  -> Tensor``
* ``decode(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left=-1, softcap=0.0,
  sinks=None, k_scale=None, v_scale=None) -> Tensor``
* ``prefill_with_lse(<prefill's arguments>) -> (Tensor out, Tensor lse)`` and
  ``decode_with_lse(<decode's arguments>) -> (Tensor out, Tensor lse)``: lse float32 ``[Tq, H]``
  / ``[B, H]``, the natural log of each row's softmax denominator (sinks included).
* ``merge_states(out_a, lse_a, out_b, lse_b) -> (Tensor out, Tensor lse)``.

One ``CompositeExplicitAutograd`` kernel per op validates metadata, optionally validates data
(``ATTN_OPS_CHECK=1``), and hands the call to the backend the registry picks for the device and
configuration. The fake kernels run the same metadata checks, so bad calls fail at trace time,
and never read data. The ops are inference-only: backward raises a clear error.
The Python functions with keyword arguments and ``backend=`` live in :mod:`attn_ops.api`.

Backend functions take the contract's new arguments as keywords, passed only when used
(``sinks=``, ``k_scale=``/``v_scale=``, ``return_lse=True``): a backend whose ``supports()``
refuses sinks, FP8 caches and LSE keeps its original signature.
"""

from __future__ import annotations

import torch

from attn_ops import checks, contract, registry

_LIB = torch.library.Library("attn", "DEF")

_PREFILL_ARGS = (
    "Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "SymInt max_seqlen_q, SymInt max_seqlen_k, float scale, bool causal=True, "
    "Tensor? block_table=None, SymInt window_left=-1, float softcap=0.0, Tensor? sinks=None, "
    "Tensor? k_scale=None, Tensor? v_scale=None")
_DECODE_ARGS = (
    "Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens_k, Tensor block_table, "
    "float scale, SymInt window_left=-1, float softcap=0.0, Tensor? sinks=None, "
    "Tensor? k_scale=None, Tensor? v_scale=None")
_LIB.define(
    "store_kvcache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    "Tensor slot_mapping, Tensor? k_scale=None, Tensor? v_scale=None) -> ()")
_LIB.define(f"prefill({_PREFILL_ARGS}) -> Tensor")
_LIB.define(f"decode({_DECODE_ARGS}) -> Tensor")
_LIB.define(f"prefill_with_lse({_PREFILL_ARGS}) -> (Tensor out, Tensor lse)")
_LIB.define(f"decode_with_lse({_DECODE_ARGS}) -> (Tensor out, Tensor lse)")
_LIB.define("merge_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) "
            "-> (Tensor out, Tensor lse)")


# The memo's signature (see registry.lookup) holds what the tensor guard does not see: the op
# name (which checks and which config), every scalar argument (each is checked, and the config
# reads window_left, softcap and causal), which optional tensors were given (the checks, the
# config's has_sinks / FP8, and the guard's arity), and the lead tensor's shape: not needed for
# correctness (the guard checks it) but it keeps each dict entry to one signature when a serving
# loop cycles through batch sizes. The guard covers every given tensor's shape, strides, dtype,
# device, dispatch keys and requires_grad. Every tuple element is a cheap attribute read.

_NO_EXTRAS: dict = {}
_LSE = {"return_lse": True}


def _extras(sinks, k_scale, v_scale, with_lse=False) -> dict:
    """The contract-growth arguments a backend receives, as keywords, only when used."""
    if sinks is None and k_scale is None and v_scale is None:
        return _LSE if with_lse else _NO_EXTRAS  # no new dict (the call unpacks a copy)
    kw = {}
    if sinks is not None:
        kw["sinks"] = sinks
    if k_scale is not None or v_scale is not None:
        kw["k_scale"], kw["v_scale"] = k_scale, v_scale
    if with_lse:
        kw["return_lse"] = True
    return kw


def _given(tensors: tuple, optional: tuple) -> tuple[tuple, tuple]:
    """``tensors`` plus the optional tensors given, and which were given (for the signature)."""
    return (tensors + tuple(t for t in optional if t is not None),
            tuple(t is not None for t in optional))


def _lse_like(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised float32 ``[rows, H]`` for the fake kernels (q ``[rows, H, D]``)."""
    return q.new_empty(q.shape[:2], dtype=torch.float32)


_lookup = registry.lookup
_decide = registry.decide
_checks_requested = checks.data_checks_requested


# ---------------------------------------------------------------------------------------------
# store_kvcache
# ---------------------------------------------------------------------------------------------

def _store_kvcache_kernel(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    tensors = (key, value, k_cache, v_cache, slot_mapping)
    if k_scale is None and v_scale is None:
        sig = ("store_kvcache", key.shape)
        extras = _NO_EXTRAS
    else:
        tensors, given = _given(tensors, (k_scale, v_scale))
        sig = ("store_kvcache", key.shape, given)
        extras = {"k_scale": k_scale, "v_scale": v_scale}
    run = _lookup(sig, tensors)
    if run is None:
        run = _decide(sig, tensors, lambda: checks.check_store_kvcache(
            key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale),
            lambda: contract.store_config(key, k_cache, slot_mapping, v_cache))
    if _checks_requested() and checks.data_checks_enabled(slot_mapping):
        checks.check_slots_in_range(slot_mapping, k_cache.shape[0] * k_cache.shape[1])
    run(key, value, k_cache, v_cache, slot_mapping, **extras)


@torch.library.register_fake("attn::store_kvcache", lib=_LIB)
def _store_kvcache_fake(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    checks.check_store_kvcache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return None


# ---------------------------------------------------------------------------------------------
# prefill, prefill_with_lse
# ---------------------------------------------------------------------------------------------

def _prefill_kernel_for(with_lse: bool):
    """The kernel of prefill (or prefill_with_lse): one Python frame per call, not two."""
    op = "prefill_with_lse" if with_lse else "prefill"
    plain = _LSE if with_lse else _NO_EXTRAS  # the keywords of a call with no optional tensor

    def kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
               causal=True, block_table=None, window_left=-1, softcap=0.0, sinks=None,
               k_scale=None, v_scale=None):
        tensors = (q, k, v, cu_seqlens_q, cu_seqlens_k)
        if block_table is None and sinks is None and k_scale is None and v_scale is None:
            sig = (op, q.shape, max_seqlen_q, max_seqlen_k, scale, causal, window_left, softcap)
            extras = plain
        else:
            tensors, given = _given(tensors, (block_table, sinks, k_scale, v_scale))
            sig = (op, q.shape, max_seqlen_q, max_seqlen_k, scale, causal, window_left, softcap,
                   given)
            extras = _extras(sinks, k_scale, v_scale, with_lse)
        run = _lookup(sig, tensors)
        if run is None:
            run = _decide(sig, tensors, lambda: checks.check_prefill(
                q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                block_table, window_left, softcap, sinks, k_scale, v_scale),
                lambda: contract.prefill_config(q, k, causal, block_table, window_left, softcap,
                                                sinks, with_lse, v))
        if _checks_requested() and checks.data_checks_enabled(q, cu_seqlens_q):
            checks.check_prefill_data(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, block_table, causal)
        return run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                   causal, block_table, window_left, softcap, **extras)

    kernel.__name__ = kernel.__qualname__ = f"_{op}_kernel"
    return kernel


_prefill_kernel = _prefill_kernel_for(False)
_prefill_with_lse_kernel = _prefill_kernel_for(True)


@torch.library.register_fake("attn::prefill", lib=_LIB)
def _prefill_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                  causal=True, block_table=None, window_left=-1, softcap=0.0, sinks=None,
                  k_scale=None, v_scale=None):
    checks.check_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                         causal, block_table, window_left, softcap, sinks, k_scale, v_scale)
    return q.new_empty(q.shape)


@torch.library.register_fake("attn::prefill_with_lse", lib=_LIB)
def _prefill_with_lse_fake(*args):
    return _prefill_fake(*args), _lse_like(args[0])


# ---------------------------------------------------------------------------------------------
# decode, decode_with_lse
# ---------------------------------------------------------------------------------------------

def _decode_kernel_for(with_lse: bool):
    """The kernel of decode (or decode_with_lse): one Python frame per call, not two."""
    op = "decode_with_lse" if with_lse else "decode"
    plain = _LSE if with_lse else _NO_EXTRAS  # the keywords of a call with no optional tensor

    def kernel(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left=-1, softcap=0.0,
               sinks=None, k_scale=None, v_scale=None):
        tensors = (q, k_cache, v_cache, seqlens_k, block_table)
        if sinks is None and k_scale is None and v_scale is None:
            sig = (op, q.shape, scale, window_left, softcap)
            extras = plain
        else:
            tensors, given = _given(tensors, (sinks, k_scale, v_scale))
            sig = (op, q.shape, scale, window_left, softcap, given)
            extras = _extras(sinks, k_scale, v_scale, with_lse)
        run = _lookup(sig, tensors)
        if run is None:
            run = _decide(sig, tensors, lambda: checks.check_decode(
                q, k_cache, v_cache, seqlens_k, block_table, scale, window_left, softcap, sinks,
                k_scale, v_scale),
                lambda: contract.decode_config(q, k_cache, window_left, softcap, sinks, with_lse,
                                               v_cache))
        if _checks_requested() and checks.data_checks_enabled(q, seqlens_k):
            checks.check_decode_data(k_cache, seqlens_k, block_table)
        return run(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left, softcap,
                   **extras)

    kernel.__name__ = kernel.__qualname__ = f"_{op}_kernel"
    return kernel


_decode_kernel = _decode_kernel_for(False)
_decode_with_lse_kernel = _decode_kernel_for(True)


@torch.library.register_fake("attn::decode", lib=_LIB)
def _decode_fake(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left=-1, softcap=0.0,
                 sinks=None, k_scale=None, v_scale=None):
    checks.check_decode(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left, softcap,
                        sinks, k_scale, v_scale)
    return q.new_empty(q.shape)


@torch.library.register_fake("attn::decode_with_lse", lib=_LIB)
def _decode_with_lse_fake(*args):
    return _decode_fake(*args), _lse_like(args[0])


# ---------------------------------------------------------------------------------------------
# merge_states
# ---------------------------------------------------------------------------------------------

def _merge_states_kernel(out_a, lse_a, out_b, lse_b):
    run = registry.dispatch(
        ("merge_states", out_a.shape), (out_a, lse_a, out_b, lse_b),
        lambda: checks.check_merge_states(out_a, lse_a, out_b, lse_b),
        lambda: contract.merge_config(out_a))
    return run(out_a, lse_a, out_b, lse_b)


@torch.library.register_fake("attn::merge_states", lib=_LIB)
def _merge_states_fake(out_a, lse_a, out_b, lse_b):
    checks.check_merge_states(out_a, lse_a, out_b, lse_b)
    return out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape)


_KERNELS = {"store_kvcache": _store_kvcache_kernel, "prefill": _prefill_kernel,
            "decode": _decode_kernel, "prefill_with_lse": _prefill_with_lse_kernel,
            "decode_with_lse": _decode_with_lse_kernel, "merge_states": _merge_states_kernel}
for _name, _kernel in _KERNELS.items():
    _LIB.impl(_name, _kernel, "CompositeExplicitAutograd")


# ---------------------------------------------------------------------------------------------
# Inference-only: a clear error instead of silently missing gradients
# ---------------------------------------------------------------------------------------------

class _InferenceOnly(torch.autograd.Function):
    """Marks an attn op's output as differentiable only to say, on backward, that it is not."""

    @staticmethod
    def forward(ctx, out, *inputs):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("attn ops are inference-only: torch.ops.attn.prefill/decode/"
                           "merge_states have no backward. Run under torch.no_grad() / "
                           "inference_mode(), or keep the original attention for training.")


# Dispatch keys a call may still pass through below Autograd without changing what it computes:
# the tensors' device backend and ADInplaceOrView (a fallthrough for these ops).
_BELOW_AUTOGRAD = torch._C._dispatch_keyset_full_after(
    torch._C.DispatchKey.AutogradFunctionality)
_DENSE_BACKENDS = frozenset(getattr(torch._C.DispatchKey, k) for k in
                            ("CPU", "CUDA", "XPU", "MPS", "PrivateUse1", "HIP")
                            if hasattr(torch._C.DispatchKey, k))
_direct_keysets: dict[int, bool] = {}


def _runs_directly(keyset) -> bool:
    """True when the kernel below Autograd for ``keyset`` is our CompositeExplicitAutograd one.

    False when a Python key (fake tensors, tensor subclasses, dispatch modes), Functionalize,
    functorch or a conjugate/negative view sits in between: those calls redispatch.
    """
    raw = keyset.raw_repr()
    direct = _direct_keysets.get(raw)
    if direct is None:
        rest = (keyset & _BELOW_AUTOGRAD).remove(torch._C.DispatchKey.ADInplaceOrView)
        direct = _direct_keysets[raw] = rest.highestPriorityTypeId() in _DENSE_BACKENDS
    return direct


def _autograd_kernel(op, impl, tensors: int, first_optional: int):
    """A thin Autograd-key kernel: run below autograd; attach the raising node only if needed.

    torch.library.register_autograd would do the same through a generic Python layer that cost
    ~13 us more per eager call (CPU, 2026-11-21), a third of a small decode call's host time.
    When no input needs a gradient and nothing but the device backend lies below Autograd
    (plain tensors, no mode: the eager serving path), ``impl`` (the CompositeExplicitAutograd
    kernel) is called directly: the redispatch it replaces, with its below-autograd guard, cost
    ~5 us of the op path's ~11 (no-op backend, CPU, 2026-11-30). Everything else (fake
    tensors while tracing, subclasses, modes, inputs that require grad) redispatches.

    ``tensors``: the op's leading Tensor arguments; ``first_optional``: the position of its first
    optional tensor (the arguments from there are tensors, None or scalars). Reading
    ``requires_grad`` by position costs ~0.1 us less than testing every argument's type.
    """
    grad_enabled = torch.is_grad_enabled
    direct_keysets = _direct_keysets
    tensor = torch.Tensor

    def kernel(keyset, *args):
        needs = None
        if grad_enabled():
            needs = [a for a in args[:tensors] if a.requires_grad]
            if len(args) > first_optional:
                needs += [a for a in args[first_optional:]
                          if isinstance(a, tensor) and a.requires_grad]
        if not needs:
            direct = direct_keysets.get(keyset.raw_repr())
            if direct is None:
                direct = _runs_directly(keyset)
            if direct:
                return impl(*args)
        with torch._C._AutoDispatchBelowAutograd():
            out = op(*args)
        if needs:
            if isinstance(out, tuple):
                return tuple(_InferenceOnly.apply(o, *needs) for o in out)
            out = _InferenceOnly.apply(out, *needs)
        return out
    return kernel


# Per op: its leading Tensor arguments and the position of its first optional tensor.
_TENSOR_ARGS = {"prefill": (5, 9), "prefill_with_lse": (5, 9), "decode": (5, 8),
                "decode_with_lse": (5, 8), "merge_states": (4, 4)}
for _name, (_tensors, _first_optional) in _TENSOR_ARGS.items():
    _LIB.impl(_name, _autograd_kernel(getattr(torch.ops.attn, _name).default, _KERNELS[_name],
                                      _tensors, _first_optional),
              "Autograd", with_keyset=True)
