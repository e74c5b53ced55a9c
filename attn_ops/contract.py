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

OPS = ("store_kvcache", "prefill", "decode")


@dataclasses.dataclass(frozen=True)
class OpConfig:
    """What decides whether and how a backend serves one call: metadata only, hashable.

    Attributes:
        op: "store_kvcache", "prefill" or "decode".
        device: the device of q (of key for the store).
        dtype: q's dtype (the caches' dtype for the store).
        head_dim: D.
        num_kv_heads: Hkv.
        num_heads: H (None for the store).
        block_size: the paged caches' block size (None for a dense prefill).
        paged: prefill reads its keys through a block table (decode always does).
        causal: bottom-right causal mask (decode is causal by definition).
        window_left: -1 (no window) or the left window in tokens.
        softcap: 0.0 (off) or the tanh cap.
        slot_dtype: slot_mapping's dtype (store only).
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

    def replace(self, **changes) -> OpConfig:
        """A copy with ``changes`` applied (for tests, tables and benchmarks)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """``dtype=..., head_dim=...`` for error messages (device and op are said elsewhere)."""
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                         if f.name not in ("op", "device"))


def store_config(key: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor) -> OpConfig:
    """The config of ``store_kvcache(key [T, Hkv, D], ..., k_cache [N, bs, Hkv, D], slots [T])``."""
    return OpConfig("store_kvcache", key.device, key.dtype, int(k_cache.shape[3]),
                    int(k_cache.shape[2]), block_size=int(k_cache.shape[1]), paged=True,
                    slot_dtype=slot_mapping.dtype)


def prefill_config(q: torch.Tensor, k: torch.Tensor, causal: bool = True,
                   block_table: torch.Tensor | None = None, window_left: int = -1,
                   softcap: float = 0.0) -> OpConfig:
    """The config of a prefill with q ``[Tq, H, D]`` and k ``[Tk, Hkv, D]`` or a paged cache."""
    paged = block_table is not None
    return OpConfig("prefill", q.device, q.dtype, int(q.shape[2]),
                    int(k.shape[2] if paged else k.shape[1]), num_heads=int(q.shape[1]),
                    block_size=int(k.shape[1]) if paged else None, paged=paged,
                    causal=bool(causal), window_left=int(window_left), softcap=float(softcap))


def decode_config(q: torch.Tensor, k_cache: torch.Tensor, window_left: int = -1,
                  softcap: float = 0.0) -> OpConfig:
    """The config of a decode with q ``[B, H, D]`` over k_cache ``[N, bs, Hkv, D]``."""
    return OpConfig("decode", q.device, q.dtype, int(q.shape[2]), int(k_cache.shape[2]),
                    num_heads=int(q.shape[1]), block_size=int(k_cache.shape[1]), paged=True,
                    window_left=int(window_left), softcap=float(softcap))
