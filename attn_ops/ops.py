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


def _meta(t):
    """The metadata of ``t`` that the checks and the choice read (None stays None).

    The kernels spell it out inline for their required tensors: a Python call per tensor is
    ~0.15 us of a ~10 us op path.
    """
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


_NO_EXTRAS: dict = {}


def _extras(sinks, k_scale, v_scale, with_lse=False) -> dict:
    """The contract-growth arguments a backend receives, as keywords, only when used."""
    if sinks is None and k_scale is None and v_scale is None and not with_lse:
        return _NO_EXTRAS  # the common call: no new dict
    kw = {}
    if sinks is not None:
        kw["sinks"] = sinks
    if k_scale is not None or v_scale is not None:
        kw["k_scale"], kw["v_scale"] = k_scale, v_scale
    if with_lse:
        kw["return_lse"] = True
    return kw


def _lse_like(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised float32 ``[rows, H]`` for the fake kernels (q ``[rows, H, D]``)."""
    return q.new_empty(q.shape[:2], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# store_kvcache
# ---------------------------------------------------------------------------------------------

def _store_kvcache_kernel(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    run = registry.dispatch(
        ("store_kvcache", key.shape, key.stride(), key.dtype, key.device, value.shape,
         value.stride(), value.dtype, value.device, k_cache.shape, k_cache.stride(),
         k_cache.dtype, k_cache.device, v_cache.shape, v_cache.stride(), v_cache.dtype,
         v_cache.device, slot_mapping.shape, slot_mapping.stride(), slot_mapping.dtype,
         slot_mapping.device, _meta(k_scale), _meta(v_scale)),
        lambda: checks.check_store_kvcache(key, value, k_cache, v_cache, slot_mapping, k_scale,
                                           v_scale),
        lambda: contract.store_config(key, k_cache, slot_mapping, v_cache))
    if checks.data_checks_enabled(slot_mapping):
        checks.check_slots_in_range(slot_mapping, k_cache.shape[0] * k_cache.shape[1])
    run(key, value, k_cache, v_cache, slot_mapping, **_extras(None, k_scale, v_scale))


@torch.library.register_fake("attn::store_kvcache", lib=_LIB)
def _store_kvcache_fake(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    checks.check_store_kvcache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return None


# ---------------------------------------------------------------------------------------------
# prefill, prefill_with_lse
# ---------------------------------------------------------------------------------------------

def _prefill(with_lse, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
             causal, block_table, window_left, softcap, sinks, k_scale, v_scale):
    run = registry.dispatch(
        ("prefill_with_lse" if with_lse else "prefill", q.shape, q.stride(), q.dtype, q.device,
         k.shape, k.stride(), k.dtype, k.device, v.shape, v.stride(), v.dtype, v.device,
         cu_seqlens_q.shape, cu_seqlens_q.stride(), cu_seqlens_q.dtype, cu_seqlens_q.device,
         cu_seqlens_k.shape, cu_seqlens_k.stride(), cu_seqlens_k.dtype, cu_seqlens_k.device,
         max_seqlen_q, max_seqlen_k, scale, causal, _meta(block_table), window_left, softcap,
         _meta(sinks), _meta(k_scale), _meta(v_scale)),
        lambda: checks.check_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, scale, causal, block_table, window_left,
                                     softcap, sinks, k_scale, v_scale),
        lambda: contract.prefill_config(q, k, causal, block_table, window_left, softcap, sinks,
                                        with_lse, v))
    if checks.data_checks_enabled(q, cu_seqlens_q):
        checks.check_prefill_data(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  block_table, causal)
    return run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
               block_table, window_left, softcap, **_extras(sinks, k_scale, v_scale, with_lse))


def _prefill_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                    causal=True, block_table=None, window_left=-1, softcap=0.0, sinks=None,
                    k_scale=None, v_scale=None):
    return _prefill(False, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    scale, causal, block_table, window_left, softcap, sinks, k_scale, v_scale)


def _prefill_with_lse_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             scale, causal=True, block_table=None, window_left=-1, softcap=0.0,
                             sinks=None, k_scale=None, v_scale=None):
    return _prefill(True, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    scale, causal, block_table, window_left, softcap, sinks, k_scale, v_scale)


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

def _decode(with_lse, q, k_cache, v_cache, seqlens_k, block_table, scale, window_left, softcap,
            sinks, k_scale, v_scale):
    run = registry.dispatch(
        ("decode_with_lse" if with_lse else "decode", q.shape, q.stride(), q.dtype, q.device,
         k_cache.shape, k_cache.stride(), k_cache.dtype, k_cache.device, v_cache.shape,
         v_cache.stride(), v_cache.dtype, v_cache.device, seqlens_k.shape, seqlens_k.stride(),
         seqlens_k.dtype, seqlens_k.device, block_table.shape, block_table.stride(),
         block_table.dtype, block_table.device, scale, window_left, softcap, _meta(sinks),
         _meta(k_scale), _meta(v_scale)),
        lambda: checks.check_decode(q, k_cache, v_cache, seqlens_k, block_table, scale,
                                    window_left, softcap, sinks, k_scale, v_scale),
        lambda: contract.decode_config(q, k_cache, window_left, softcap, sinks, with_lse,
                                       v_cache))
    if checks.data_checks_enabled(q, seqlens_k):
        checks.check_decode_data(k_cache, seqlens_k, block_table)
    return run(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left, softcap,
               **_extras(sinks, k_scale, v_scale, with_lse))


def _decode_kernel(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left=-1,
                   softcap=0.0, sinks=None, k_scale=None, v_scale=None):
    return _decode(False, q, k_cache, v_cache, seqlens_k, block_table, scale, window_left,
                   softcap, sinks, k_scale, v_scale)


def _decode_with_lse_kernel(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left=-1,
                            softcap=0.0, sinks=None, k_scale=None, v_scale=None):
    return _decode(True, q, k_cache, v_cache, seqlens_k, block_table, scale, window_left,
                   softcap, sinks, k_scale, v_scale)


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
        ("merge_states", _meta(out_a), _meta(lse_a), _meta(out_b), _meta(lse_b)),
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


def _autograd_kernel(op, impl):
    """A thin Autograd-key kernel: run below autograd; attach the raising node only if needed.

    torch.library.register_autograd would do the same through a generic Python layer that cost
    ~13 us more per eager call (CPU, 2026-11-21), a third of a small decode call's host time.
    When no input needs a gradient and nothing but the device backend lies below Autograd
    (plain tensors, no mode: the eager serving path), ``impl`` (the CompositeExplicitAutograd
    kernel) is called directly: the redispatch it replaces, with its below-autograd guard, cost
    ~5 us of the op path's ~11 (no-op backend, CPU, 2026-11-30). Everything else (fake
    tensors while tracing, subclasses, modes, inputs that require grad) redispatches.
    """
    grad_enabled = torch.is_grad_enabled

    def kernel(keyset, *args):
        needs = None
        if grad_enabled():
            needs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        if not needs and _runs_directly(keyset):
            return impl(*args)
        with torch._C._AutoDispatchBelowAutograd():
            out = op(*args)
        if needs:
            if isinstance(out, tuple):
                return tuple(_InferenceOnly.apply(o, *needs) for o in out)
            out = _InferenceOnly.apply(out, *needs)
        return out
    return kernel


for _name in ("prefill", "decode", "prefill_with_lse", "decode_with_lse", "merge_states"):
    _LIB.impl(_name, _autograd_kernel(getattr(torch.ops.attn, _name).default, _KERNELS[_name]),
              "Autograd", with_keyset=True)
