"""The op contract's data: its constants and the typed configuration every decision reads.

One :class:`OpConfig` is built per call signature (from tensor metadata only, never data) and
handed to everything that decides how a call runs: the registry, each backend's ``supports()``,
the auto table and the graph passes' eligibility. It is frozen and hashable, so choices can be
memoised on it.

Where a new op argument goes: the schema and fake in :mod:`attn_ops.ops`, its validation in
:mod:`attn_ops.checks`, a field here when a backend's ability depends on it, and every backend.
"""

from __future__ import annotations

import dataclasses

import torch

# Head dims of the contract: multiples of 8 up to 256. A backend may serve fewer (its supports()).
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 8
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

# FP8 KV caches: float8_e4m3fn, read by fp16/bf16 queries as ``x * scale`` and written as
# ``saturate(x / scale)``. 448 is e4m3fn's largest finite value (it has no infinity).
FP8_DTYPES = (torch.float8_e4m3fn,)
FP8_QUERY_DTYPES = (torch.float16, torch.bfloat16)
FP8_MAX = 448.0

OPS = ("store_kvcache", "prefill", "decode", "merge_states")

# A prefill whose sequences have at most this many keys (its max_seqlen_k, a host int) is
# "short": the auto table measures short and long prefills apart. H200, bf16 32/8 heads D 128,
# ours against FA3 varlen through the op: 64 x 256 1.25x, 16 x 1024 1.04x, but 4 x 4096 0.91x.
SHORT_PREFILL_KEYS = 1024


@dataclasses.dataclass(frozen=True)
class OpConfig:
    """What decides whether and how a backend serves one call: metadata only, hashable.

    Attributes:
        op: "store_kvcache", "prefill", "decode" or "merge_states" (the ``_with_lse`` ops are
            prefill / decode with ``with_lse``).
        device: the device of q (of key for the store, of out_a for merge_states).
        dtype: q's dtype (key's for the store, out_a's for merge_states).
        head_dim: D.
        num_kv_heads: Hkv.
        num_heads: H (None for the store).
        block_size: the paged caches' block size (None for a dense prefill).
        paged: prefill reads its keys through a block table (decode always does).
        causal: bottom-right causal mask (decode is causal by definition).
        window_left: -1 (no window) or the left window in tokens.
        softcap: 0.0 (off) or the tanh cap.
        slot_dtype: slot_mapping's dtype (store only).
        cache_dtype: the dtype of k/v or the caches (float8_e4m3fn for an FP8 cache; None for
            merge_states). The store's k_cache dtype; equal to ``dtype`` unless FP8.
        has_sinks: per-head sink logits join each row's softmax denominator.
        with_lse: the call also returns the log-sum-exp (``prefill_with_lse``/``decode_with_lse``).
        cache_contiguous: both paged caches are contiguous tensors. False for any other strided
            ``[num_blocks, block_size, Hkv, D]`` view with a contiguous last dim (a dense
            ``[B, Hkv, S, D]`` cache transposed, padded strides), which a backend that reads
            caches as one flat buffer refuses. True for a dense (unpaged) prefill.
        short_keys: prefill: True when its ``max_seqlen_k`` is at most
            :data:`SHORT_PREFILL_KEYS`, False above; None when not known (decode, the store,
            a config built without it). Only the auto table reads it.
    """

    op: str
    device: torch.device
    dtype: torch.dtype
    head_dim: int
    num_kv_heads: int
    num_heads: int | None = None
    block_size: int | None = None
    paged: bool = False
    causal: bool = True
    window_left: int = -1
    softcap: float = 0.0
    slot_dtype: torch.dtype | None = None
    cache_dtype: torch.dtype | None = None
    has_sinks: bool = False
    with_lse: bool = False
    cache_contiguous: bool = True
    short_keys: bool | None = None

    @property
    def fp8_cache(self) -> bool:
        """The keys and values are stored as float8_e4m3fn and read as ``x * scale``."""
        return self.cache_dtype in FP8_DTYPES

    def replace(self, **changes) -> OpConfig:
        """A copy with ``changes`` applied (for tests, tables and benchmarks)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """``dtype=..., head_dim=...`` for error messages (device and op are said elsewhere)."""
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                         if f.name not in ("op", "device"))


def caches_contiguous(k_cache: torch.Tensor, v_cache: torch.Tensor | None) -> bool:
    """Both caches are contiguous (``v_cache`` None: only ``k_cache`` is known)."""
    return bool(k_cache.is_contiguous()) and (v_cache is None or bool(v_cache.is_contiguous()))


def store_config(key: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 v_cache: torch.Tensor | None = None) -> OpConfig:
    """The config of ``store_kvcache(key [T, Hkv, D], ..., k_cache [N, bs, Hkv, D], slots [T])``."""
    return OpConfig("store_kvcache", key.device, key.dtype, int(k_cache.shape[3]),
                    int(k_cache.shape[2]), block_size=int(k_cache.shape[1]), paged=True,
                    slot_dtype=slot_mapping.dtype, cache_dtype=k_cache.dtype,
                    cache_contiguous=caches_contiguous(k_cache, v_cache))


def prefill_config(q: torch.Tensor, k: torch.Tensor, causal: bool = True,
                   block_table: torch.Tensor | None = None, window_left: int = -1,
                   softcap: float = 0.0, sinks: torch.Tensor | None = None,
                   with_lse: bool = False, v: torch.Tensor | None = None,
                   max_seqlen_k: int | None = None) -> OpConfig:
    """The config of a prefill with q ``[Tq, H, D]`` and k ``[Tk, Hkv, D]`` or a paged cache
    (``v``: the value cache, read for ``cache_contiguous``; ``max_seqlen_k``: the call's, for
    ``short_keys``)."""
    paged = block_table is not None
    short = None if max_seqlen_k is None else int(max_seqlen_k) <= SHORT_PREFILL_KEYS
    return OpConfig("prefill", q.device, q.dtype, int(q.shape[2]),
                    int(k.shape[2] if paged else k.shape[1]), num_heads=int(q.shape[1]),
                    block_size=int(k.shape[1]) if paged else None, paged=paged,
                    causal=bool(causal), window_left=int(window_left), softcap=float(softcap),
                    cache_dtype=k.dtype, has_sinks=sinks is not None, with_lse=bool(with_lse),
                    cache_contiguous=not paged or caches_contiguous(k, v), short_keys=short)


def decode_config(q: torch.Tensor, k_cache: torch.Tensor, window_left: int = -1,
                  softcap: float = 0.0, sinks: torch.Tensor | None = None,
                  with_lse: bool = False, v_cache: torch.Tensor | None = None) -> OpConfig:
    """The config of a decode with q ``[B, H, D]`` over k_cache ``[N, bs, Hkv, D]``."""
    return OpConfig("decode", q.device, q.dtype, int(q.shape[2]), int(k_cache.shape[2]),
                    num_heads=int(q.shape[1]), block_size=int(k_cache.shape[1]), paged=True,
                    window_left=int(window_left), softcap=float(softcap),
                    cache_dtype=k_cache.dtype, has_sinks=sinks is not None,
                    with_lse=bool(with_lse), cache_contiguous=caches_contiguous(k_cache, v_cache))


def merge_config(out_a: torch.Tensor) -> OpConfig:
    """The config of ``merge_states(out_a [N, H, D], lse_a [N, H], ...)``."""
    return OpConfig("merge_states", out_a.device, out_a.dtype, int(out_a.shape[2]),
                    int(out_a.shape[1]), num_heads=int(out_a.shape[1]), with_lse=True)
