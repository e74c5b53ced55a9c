"""Flash backend: FlashAttention kernels from the flash-attn packages or from PyTorch itself.

Four providers, each optional, tried in this fixed order (fastest first, by the H100 reference
figures of docs/measuring.md: FA3 608 vs FA2 330 TFLOP/s on causal bf16 prefill; FA3
1145-2892 vs FA2 1032-2435 GB/s on decode):

  provider  kernels                                  arch   dtypes     paged KV    window  softcap
  fa3       flash_attn_interface (FA3)               sm90   fp16/bf16  any block   yes     yes
  fa3_fwd   fa3_fwd_interface (forward-only FA3)     sm90   bf16 *     no *        no *    yes *
  fa2       flash_attn package (FA2)                 sm80+  fp16/bf16  bs % 256    yes     >= 2.6
  aten      torch.ops.aten._flash_attention_forward  sm80+  fp16/bf16  bs % 256 ** yes     no

  * read from the build flags of fa3-fwd (``fa3_fwd_config``; 0.0.3 shown).
  ** torch >= 2.13 only: the op gains ``block_table`` there.

Every provider also serves ``prefill_with_lse`` / ``decode_with_lse`` where its entry point
returns the softmax LSE (natural log, float32). Sinks and FP8 caches are refused with the exact
reason (:mod:`.providers`). ``ATTN_OPS_FLASH_IMPL=<provider>`` restricts the backend to one
provider (for benchmarks; call ``attn_ops.registry.clear_cache()`` after changing it).

Layout: :mod:`.providers` finds the installed libraries and decides which one serves a call;
:mod:`.calls` builds the call adapters. This module is the backend interface the registry uses
(``supports``, ``bind``, the op functions). The registry memoises :func:`bind` per call
signature, so a call costs the kernel call and the fix-ups its provider needs (see
:mod:`.calls`), nothing else.
"""

from __future__ import annotations

import functools
import os

import torch

from attn_ops.backends.flash import calls
from attn_ops.backends.flash.providers import (  # noqa: F401 (the backend's public names)
    FA2_PAGE_MULTIPLE, HALF_DTYPES, NO_FP8, NO_MERGE, NO_SINKS, NO_STORE, NO_STRIDED_CACHE,
    PROVIDER_ORDER, Provider, _detect_one, _fa2_provider, _fa3_fwd_provider, _fa3_provider,
    aten_provider, choose, detect, provider_reason, raw_fwd)
from attn_ops.contract import OpConfig, decode_config, prefill_config
from attn_ops.registry import BackendUnavailable

name = "flash"


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple:
    return tuple(torch.cuda.get_device_capability(index))


def _forced() -> str | None:
    return os.environ.get("ATTN_OPS_FLASH_IMPL") or None


@functools.lru_cache(maxsize=1024)
def _plan(config: OpConfig, forced: str | None) -> tuple[Provider | None, str | None]:
    device = config.device
    if device.type != "cuda":
        return None, f"FlashAttention kernels need a CUDA device (got {device.type})"
    if config.op != "store_kvcache" and config.dtype in HALF_DTYPES:
        if not torch.cuda.is_available():
            return None, "CUDA is not available here (torch.cuda.is_available() is False)"
        index = device.index if device.index is not None else torch.cuda.current_device()
        return choose(config, _capability(index), detect(), forced)
    return choose(config, (0, 0), (), forced)  # the reason, without importing anything


def supports(config: OpConfig) -> str | None:
    """None when a FlashAttention provider serves the call ``config`` describes, else why."""
    return _plan(config, _forced())[1]


def describe(config: OpConfig) -> str:
    """The provider serving ``config`` (for benchmark tables), or why none does."""
    provider, reason = _plan(config, _forced())
    return provider.label if provider is not None else f"unavailable: {reason}"


def provider_id(config: OpConfig) -> str | None:
    """The id (one of :data:`PROVIDER_ORDER`, e.g. "fa3_fwd", "aten") of the provider serving
    ``config``, or None when none does: what the auto table's ``flash:<id>`` items and the
    benchmark's ``impl`` column name. Memoised per config (with :func:`supports`)."""
    provider = _plan(config, _forced())[0]
    return provider.name if provider is not None else None


def _provider(config: OpConfig) -> Provider:
    provider, reason = _plan(config, _forced())
    if provider is None:
        raise BackendUnavailable(f"attn backend 'flash' cannot run {config.op}: {reason}")
    return provider


def bind(config: OpConfig):
    """The op function for ``config``: provider, entry point and options chosen once (the
    registry memoises it per call signature)."""
    if config.op == "store_kvcache":
        return store_kvcache
    return calls.bind(_provider(config), config)


def store_kvcache(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Not offered (see :func:`supports`); the registry never routes store_kvcache here."""
    raise BackendUnavailable(f"attn backend 'flash' cannot run store_kvcache: {NO_STORE}")


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
            causal: bool = True, block_table: torch.Tensor | None = None, window_left: int = -1,
            softcap: float = 0.0, return_lse: bool = False):
    """Varlen attention. q ``[Tq, H, D]`` fp16/bf16; k/v ``[Tk, Hkv, D]`` or paged caches
    ``[num_blocks, block_size, Hkv, D]`` with ``block_table`` ``[B, W]``. Out ``[Tq, H, D]``
    (and lse float32 ``[Tq, H]`` with ``return_lse``). Binds on every call: the op path binds
    once per signature through :func:`bind`."""
    config = prefill_config(q, k, causal, block_table, window_left, softcap,
                            with_lse=return_lse, v=v)
    return calls.bind(_provider(config), config)(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
        block_table, window_left, softcap)


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens_k: torch.Tensor,
           block_table: torch.Tensor, scale: float, window_left: int = -1, softcap: float = 0.0,
           return_lse: bool = False):
    """One query per sequence. q ``[B, H, D]`` fp16/bf16; paged caches; seqlens_k ``[B]`` int32.
    Out ``[B, H, D]`` (and lse float32 ``[B, H]``); rows with ``seqlens_k == 0`` are zero
    (lse -inf)."""
    config = decode_config(q, k_cache, window_left, softcap, with_lse=return_lse,
                           v_cache=v_cache)
    return calls.bind(_provider(config), config)(q, k_cache, v_cache, seqlens_k, block_table,
                                                 scale, window_left, softcap)
