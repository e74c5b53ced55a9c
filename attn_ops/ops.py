"""The three attn custom ops: schemas, fake kernels, the dispatching kernel, Python wrappers.

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
"""

from __future__ import annotations

import torch

from attn_ops import checks, registry

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


# ---------------------------------------------------------------------------------------------
# Configuration keys the registry and backends' supports() see
# ---------------------------------------------------------------------------------------------

def store_config(key, k_cache, slot_mapping) -> dict:
    return dict(device=key.device, dtype=key.dtype, head_dim=k_cache.shape[3],
                num_kv_heads=k_cache.shape[2], block_size=k_cache.shape[1],
                slot_dtype=slot_mapping.dtype)


def prefill_config(q, k, causal, block_table, window_left, softcap) -> dict:
    paged = block_table is not None
    return dict(device=q.device, dtype=q.dtype, head_dim=q.shape[2], num_heads=q.shape[1],
                num_kv_heads=k.shape[2] if paged else k.shape[1], causal=bool(causal),
                paged=paged, block_size=k.shape[1] if paged else None,
                window_left=int(window_left), softcap=float(softcap))


def decode_config(q, k_cache, window_left, softcap) -> dict:
    return dict(device=q.device, dtype=q.dtype, head_dim=q.shape[2], num_heads=q.shape[1],
                num_kv_heads=k_cache.shape[2], block_size=k_cache.shape[1],
                window_left=int(window_left), softcap=float(softcap))


# ---------------------------------------------------------------------------------------------
# Validated-call memo: metadata checks and backend choice, once per call signature
# ---------------------------------------------------------------------------------------------

# The metadata checks and the registry lookup cost ~30 us of Python per eager call (measured on
# CPU, 2026-11-21), more than a decode kernel takes on a GPU. Both depend only on metadata, so
# their outcome is memoised per signature (shapes, strides, dtypes, devices, scalars, backend
# choice): a serving loop pays them once per batch shape. Failing calls are never memoised.
_MEMO_LIMIT = 4096
_memo: dict = {}


def _meta(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _plan(op, signature, validate, config):
    """Run ``validate()`` and pick the backend for ``op`` unless ``signature`` was seen before."""
    key = (op, registry.current_choice(), signature)
    backend = _memo.get(key)
    if backend is None:
        validate()
        backend = registry.select(op, config(), key[1])
        if len(_memo) >= _MEMO_LIMIT:
            _memo.clear()
        _memo[key] = backend
    return backend


def clear_memo() -> None:
    """Forget memoised call signatures (with :func:`attn_ops.registry.clear_cache`)."""
    _memo.clear()


# ---------------------------------------------------------------------------------------------
# store_kvcache
# ---------------------------------------------------------------------------------------------

def _store_kvcache_kernel(key, value, k_cache, v_cache, slot_mapping):
    backend = _plan(
        "store_kvcache",
        (_meta(key), _meta(value), _meta(k_cache), _meta(v_cache), _meta(slot_mapping)),
        lambda: checks.check_store_kvcache(key, value, k_cache, v_cache, slot_mapping),
        lambda: store_config(key, k_cache, slot_mapping))
    if checks.data_checks_enabled(slot_mapping):
        checks.check_slots_in_range(slot_mapping, k_cache.shape[0] * k_cache.shape[1])
    backend.store_kvcache(key, value, k_cache, v_cache, slot_mapping)


@torch.library.register_fake("attn::store_kvcache", lib=_LIB)
def _store_kvcache_fake(key, value, k_cache, v_cache, slot_mapping):
    checks.check_store_kvcache(key, value, k_cache, v_cache, slot_mapping)
    return None


# ---------------------------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------------------------

def _prefill_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                    causal=True, block_table=None, window_left=-1, softcap=0.0):
    backend = _plan(
        "prefill",
        (_meta(q), _meta(k), _meta(v), _meta(cu_seqlens_q), _meta(cu_seqlens_k), max_seqlen_q,
         max_seqlen_k, scale, causal, _meta(block_table), window_left, softcap),
        lambda: checks.check_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, scale, causal, block_table, window_left,
                                     softcap),
        lambda: prefill_config(q, k, causal, block_table, window_left, softcap))
    if checks.data_checks_enabled(q, cu_seqlens_q):
        checks.check_prefill_data(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  block_table)
    return backend.prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                           causal, block_table, window_left, softcap)


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
    backend = _plan(
        "decode",
        (_meta(q), _meta(k_cache), _meta(v_cache), _meta(seqlens_k), _meta(block_table), scale,
         window_left, softcap),
        lambda: checks.check_decode(q, k_cache, v_cache, seqlens_k, block_table, scale,
                                    window_left, softcap),
        lambda: decode_config(q, k_cache, window_left, softcap))
    if checks.data_checks_enabled(q, seqlens_k):
        checks.check_decode_data(k_cache, seqlens_k, block_table)
    return backend.decode(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left, softcap)


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


# ---------------------------------------------------------------------------------------------
# Python wrappers (eager convenience: keyword arguments and a per-call backend)
# ---------------------------------------------------------------------------------------------

_STORE = torch.ops.attn.store_kvcache.default
_PREFILL = torch.ops.attn.prefill.default
_DECODE = torch.ops.attn.decode.default


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                  backend: str | None = None) -> None:
    """Write new tokens' keys and values into the paged caches, in place.

    Args:
        key, value: ``[T, Hkv, D]``, the caches' dtype.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, contiguous; written in place.
        slot_mapping: ``[T]`` int32/int64, flat slot ``block_id * block_size + offset``; ``-1``
            skips the row (padding).
        backend: run on this backend ("reference", "triton", ...); None follows the context.
    """
    if backend is None:
        return _STORE(key, value, k_cache, v_cache, slot_mapping)
    with registry.use_backend(backend):
        return _STORE(key, value, k_cache, v_cache, slot_mapping)


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
            causal: bool = True, block_table: torch.Tensor | None = None, window_left: int = -1,
            softcap: float = 0.0, *, backend: str | None = None) -> torch.Tensor:
    """Variable-length attention over a batch of sequences packed token-major.

    Args:
        q: ``[Tq, H, D]`` fp32/fp16/bf16; sequence b owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.
        k, v: ``[Tk, Hkv, D]`` (rows by ``cu_seqlens_k``), or, with ``block_table``, the paged
            caches ``[num_blocks, block_size, Hkv, D]`` holding each sequence's first
            ``lk = cu_seqlens_k[b+1] - cu_seqlens_k[b]`` tokens (prefix caching).
        cu_seqlens_q, cu_seqlens_k: ``[B+1]`` int32, cumulative lengths starting at 0.
        max_seqlen_q, max_seqlen_k: host ints, upper bounds of the lengths (size the grid).
        scale: multiplies q·k (usually ``D ** -0.5``).
        causal: bottom-right aligned: query i sees key j iff ``j <= i + lk - lq``.
        block_table: ``[B, max_blocks_per_seq]`` int32 or None.
        window_left: ``w >= 0`` also requires ``j >= i + lk - lq - w``; -1 disables.
        softcap: ``c > 0`` maps scaled scores s to ``c * tanh(s / c)``; 0 disables.
        backend: run on this backend; None follows the context.

    Returns:
        ``[Tq, H, D]`` in q's dtype; a query row that sees no key is zero.

    Example:
        >>> q = torch.randn(7, 4, 64); k = v = torch.randn(7, 2, 64)
        >>> cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        >>> prefill(q, k, v, cu, cu, 4, 4, 64 ** -0.5).shape
        torch.Size([7, 4, 64])
    """
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
            block_table, window_left, softcap)
    if backend is None:
        return _PREFILL(*args)
    with registry.use_backend(backend):
        return _PREFILL(*args)


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens_k: torch.Tensor,
           block_table: torch.Tensor, scale: float, window_left: int = -1, softcap: float = 0.0,
           *, backend: str | None = None) -> torch.Tensor:
    """One new query per sequence against its paged KV cache.

    Args:
        q: ``[B, H, D]`` fp32/fp16/bf16.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``; store the new token's K/V first.
        seqlens_k: ``[B]`` int32, cached tokens per sequence (new one included); 0 = padded row.
        block_table: ``[B, max_blocks_per_seq]`` int32; entries past a sequence's last block are
            ignored.
        scale, window_left, softcap: as in :func:`prefill`.
        backend: run on this backend; None follows the context.

    Returns:
        ``[B, H, D]`` in q's dtype; rows with ``seqlens_k == 0`` are zero.
    """
    args = (q, k_cache, v_cache, seqlens_k, block_table, scale, window_left, softcap)
    if backend is None:
        return _DECODE(*args)
    with registry.use_backend(backend):
        return _DECODE(*args)
