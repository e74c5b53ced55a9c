"""The attn custom ops: schemas, fake kernels and the dispatching kernels, together.

All schemas of the library are defined here, each with its fake kernel beside it. Positional order
is the public contract (see docs/DESIGN.md); trailing optionals may grow.

* ``torch.ops.attn.store_kvcache(key, value, k_cache, v_cache, slot_mapping) -> ()``
* ``torch.ops.attn.prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
  scale, causal=True, block_table=None, window_left=-1, softcap=0.0) -> Tensor``
* ``torch.ops.attn.decode(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left=-1,
  softcap=0.0) -> Tensor``

One ``CompositeExplicitAutograd`` kernel per op validates metadata, optionally validates data
(``ATTN_OPS_CHECK=1``), and hands the call to the backend the registry picks for the device and
configuration. The fake kernels run the same metadata checks, so bad calls fail at trace time,
and never read data. The ops are inference-only: backward raises a clear error.
The Python functions with keyword arguments and ``backend=`` live in :mod:`attn_ops.api`.
"""

from __future__ import annotations

import torch

from attn_ops import checks, contract, registry

_LIB = torch.library.Library("attn", "DEF")

_LIB.define(
    "store_kvcache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    "Tensor slot_mapping) -> ()")
_LIB.define(
    "prefill(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "SymInt max_seqlen_q, SymInt max_seqlen_k, float scale, bool causal=True, "
    "Tensor? block_table=None, SymInt window_left=-1, float softcap=0.0) -> Tensor")
_LIB.define(
    "decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens_k, Tensor block_table, "
    "float scale, SymInt window_left=-1, float softcap=0.0) -> Tensor")


def _meta(t):
    """The metadata of ``t`` that the checks and the choice read (None stays None)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


# ---------------------------------------------------------------------------------------------
# store_kvcache
# ---------------------------------------------------------------------------------------------

def _store_kvcache_kernel(key, value, k_cache, v_cache, slot_mapping):
    run = registry.dispatch(
        ("store_kvcache", _meta(key), _meta(value), _meta(k_cache), _meta(v_cache),
         _meta(slot_mapping)),
        lambda: checks.check_store_kvcache(key, value, k_cache, v_cache, slot_mapping),
        lambda: contract.store_config(key, k_cache, slot_mapping))
    if checks.data_checks_enabled(slot_mapping):
        checks.check_slots_in_range(slot_mapping, k_cache.shape[0] * k_cache.shape[1])
    run(key, value, k_cache, v_cache, slot_mapping)


@torch.library.register_fake("attn::store_kvcache", lib=_LIB)
def _store_kvcache_fake(key, value, k_cache, v_cache, slot_mapping):
    checks.check_store_kvcache(key, value, k_cache, v_cache, slot_mapping)
    return None


# ---------------------------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------------------------

def _prefill_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                    causal=True, block_table=None, window_left=-1, softcap=0.0):
    run = registry.dispatch(
        ("prefill", _meta(q), _meta(k), _meta(v), _meta(cu_seqlens_q), _meta(cu_seqlens_k),
         max_seqlen_q, max_seqlen_k, scale, causal, _meta(block_table), window_left, softcap),
        lambda: checks.check_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, scale, causal, block_table, window_left,
                                     softcap),
        lambda: contract.prefill_config(q, k, causal, block_table, window_left, softcap))
    if checks.data_checks_enabled(q, cu_seqlens_q):
        checks.check_prefill_data(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  block_table)
    return run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
               block_table, window_left, softcap)


@torch.library.register_fake("attn::prefill", lib=_LIB)
def _prefill_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                  causal=True, block_table=None, window_left=-1, softcap=0.0):
    checks.check_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                         causal, block_table, window_left, softcap)
    return q.new_empty(q.shape)


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------

def _decode_kernel(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left=-1,
                   softcap=0.0):
    run = registry.dispatch(
        ("decode", _meta(q), _meta(k_cache), _meta(v_cache), _meta(seqlens_k), _meta(block_table),
         scale, window_left, softcap),
        lambda: checks.check_decode(q, k_cache, v_cache, seqlens_k, block_table, scale,
                                    window_left, softcap),
        lambda: contract.decode_config(q, k_cache, window_left, softcap))
    if checks.data_checks_enabled(q, seqlens_k):
        checks.check_decode_data(k_cache, seqlens_k, block_table)
    return run(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left, softcap)


@torch.library.register_fake("attn::decode", lib=_LIB)
def _decode_fake(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left=-1, softcap=0.0):
    checks.check_decode(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left, softcap)
    return q.new_empty(q.shape)


_LIB.impl("store_kvcache", _store_kvcache_kernel, "CompositeExplicitAutograd")
_LIB.impl("prefill", _prefill_kernel, "CompositeExplicitAutograd")
_LIB.impl("decode", _decode_kernel, "CompositeExplicitAutograd")


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
        raise RuntimeError("attn ops are inference-only: torch.ops.attn.prefill/decode have no "
                           "backward. Run under torch.no_grad() / inference_mode(), or keep the "
                           "original attention for training.")


def _autograd_kernel(op):
    """A thin Autograd-key kernel: run below autograd; attach the raising node only if needed.

    torch.library.register_autograd would do the same through a generic Python layer that cost
    ~13 us more per eager call (CPU, 2026-11-21), a third of a small decode call's host time.
    """
    def kernel(*args):
        with torch._C._AutoDispatchBelowAutograd():
            out = op(*args)
        if torch.is_grad_enabled():
            needs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            if needs:
                out = _InferenceOnly.apply(out, *needs)
        return out
    return kernel


_LIB.impl("prefill", _autograd_kernel(torch.ops.attn.prefill.default), "Autograd")
_LIB.impl("decode", _autograd_kernel(torch.ops.attn.decode.default), "Autograd")
