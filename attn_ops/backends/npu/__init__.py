"""npu backend: the attn ops on Ascend NPUs through torch_npu's fused attention and cache ops.

* ``store_kvcache``: ``npu_scatter_pa_kv_cache`` (cache_mode "Norm"), else the ATB
  ``_npu_reshape_and_cache``, else ``npu_scatter_nd_update_`` on ``[nb, bs, Hkv*D]`` views:
  whichever the installed torch_npu has, in that order.
* ``prefill``: ``npu_fused_infer_attention_score_v2`` (FIA v2), TND layout, sparse_mode 3 with
  the compressed 2048x2048 causal mask (sparse_mode 4, band, for a left window); with a prefix
  cache, the caches viewed ``[nb, bs, Hkv*D]``, ``block_table`` and per-request key lengths.
* ``decode``: FIA v2, BNSD layout, ``q`` viewed ``[B, H, 1, D]``, paged caches as above.
* ``prefill_with_lse`` / ``decode_with_lse``: the same calls with ``return_softmax_lse=True``;
  FIA's fp32 ``softmax_lse`` (``(T, N, 1)`` TND, ``(B, N, 1, 1)`` BNSD) squeezed to ``[Tq, H]`` /
  ``[B, H]``; -inf for padded rows and rows that see no key (set here, not left to FIA).

**Host sync.** FIA takes its lengths as host ``int`` lists, so ``prefill`` and ``decode`` copy
``cu_seqlens`` / ``seqlens_k`` to the host (``.tolist()``, one transfer per call). This is the only
place in attn_ops where such a sync is accepted, because torch_npu requires it. It is also why
torchair's reduce-overhead mode needs :mod:`.torchair_decompose`: inside a captured graph the
lengths must be graph inputs that torchair refreshes at each replay.

**Running the lowering off-NPU.** :func:`supports` requires tensors on an ``npu`` device, so the
registry never picks this backend for CPU or CUDA tensors. The three op functions below, called
directly, lower whatever device their tensors are on: that is the documented test hook. The tests
call them on CPU tensors with a CPU emulator of the torch_npu ops registered in ``torch.ops.npu``
(tests/support/npu_emulator.py, only when torch_npu is absent). They skip the op's argument
checks, so callers pass valid inputs. :func:`store_kvcache_with` picks one store op explicitly.

Nothing here was run on Ascend hardware (see docs/npu.md).
"""

from __future__ import annotations

import dataclasses

import torch

from attn_ops.backends.npu import lowering

name = "npu"

FIA_DTYPES = (torch.float16, torch.bfloat16)
STORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# torch_npu 2.13's FIA v2 docs list TND (without rope) for bf16 and head dim 128 or 192 only.
TND_DTYPES = (torch.bfloat16,)
TND_HEAD_DIMS = (128, 192)
MAX_GQA_RATIO = 64  # num_query_heads / num_key_value_heads
MAX_PREFILL_HEADS = 256  # N axis limit when the query length is > 1
PREFILL_BLOCK_SIZES = (128, 256, 384, 512)  # paged FIA with query length > 1
DECODE_BLOCK_MULTIPLE, DECODE_MAX_BLOCK = 16, 512


def supports(config) -> str | None:
    """None when this backend can serve the call ``config`` (an ``OpConfig``) describes, else
    why."""
    op = config.op
    device = config.device
    if getattr(device, "type", device) != "npu":
        return (f"needs tensors on an Ascend NPU (device type 'npu', from torch_npu), got "
                f"{getattr(device, 'type', device)}")
    dtype, d = config.dtype, config.head_dim
    if op == "merge_states":
        return "merge_states has no torch_npu lowering here (the reference backend runs it)"
    if config.fp8_cache:
        # FIA's antiquant path (key/value_antiquant_scale, antiquant_mode) dequantises int8 caches
        # as (x + offset) * scale; a per-[Hkv] scale would be its per-channel mode, but
        # torch_npu 2.13 documents no float8_e4m3fn KV for FIA nor the cache scatter ops.
        return ("float8_e4m3fn KV caches: torch_npu 2.13's FIA antiquant scales dequantise int8 "
                "caches only, and its cache scatter ops do not quantise")
    if not config.cache_contiguous:
        # The lowering reads and writes the caches as [num_blocks, block_size, Hkv * D]
        # (k_cache.flatten(2)): a view only of a contiguous cache; of a strided one it is a
        # copy, into which a store would write and from which FIA would read stale data.
        return ("the KV caches are not contiguous (a strided [num_blocks, block_size, Hkv, D] "
                "view); FIA v2 and the cache scatter ops take [num_blocks, block_size, Hkv*D] "
                "contiguous caches")
    if op == "store_kvcache":
        if lowering.available_store_impl() is None:
            return ("this torch_npu has none of npu_scatter_pa_kv_cache, _npu_reshape_and_cache, "
                    "npu_scatter_nd_update_")
        if dtype not in STORE_DTYPES:
            return f"the cache scatter ops take fp32/fp16/bf16, got {dtype}"
        return None
    if lowering.lookup_op("npu", lowering.FIA_V2) is None:
        return f"this torch_npu has no {lowering.FIA_V2}"
    if dtype not in FIA_DTYPES:
        return f"FIA v2 takes fp16/bf16 queries, got {dtype}"
    if config.softcap > 0:
        return "FIA v2 has no logit soft-capping (softcap > 0)"
    if config.has_sinks:
        return "FIA v2 has no per-head sink logits"
    if d % 16:
        return f"FIA v2 needs a head dim that is a multiple of 16 for fp16/bf16, got {d}"
    h, hkv = config.num_heads, config.num_kv_heads
    if h // hkv > MAX_GQA_RATIO:
        return f"FIA v2 allows at most {MAX_GQA_RATIO} query heads per kv head, got {h // hkv}"
    if op == "decode":
        return _decode_reason(config)
    return _prefill_reason(config)


def _prefill_reason(config) -> str | None:
    if config.dtype not in TND_DTYPES or config.head_dim not in TND_HEAD_DIMS:
        return (f"torch_npu 2.13 documents FIA v2 in TND layout for bf16 with head dim "
                f"{'/'.join(map(str, TND_HEAD_DIMS))} only, got {config.dtype} and head dim "
                f"{config.head_dim}")
    if config.num_heads > MAX_PREFILL_HEADS:
        return f"FIA v2 allows at most {MAX_PREFILL_HEADS} heads for prefill"
    if config.paged and config.block_size not in PREFILL_BLOCK_SIZES:
        return (f"paged FIA v2 prefill needs block_size in {PREFILL_BLOCK_SIZES}, got "
                f"{config.block_size}")
    return None


def _decode_reason(config) -> str | None:
    bs = config.block_size
    if bs % DECODE_BLOCK_MULTIPLE or bs > DECODE_MAX_BLOCK:
        return (f"paged FIA v2 decode needs block_size a multiple of {DECODE_BLOCK_MULTIPLE} up "
                f"to {DECODE_MAX_BLOCK}, got {bs}")
    if config.window_left >= 0:
        return "FIA v2 ignores the sliding-window arguments when the query length is 1"
    return None


# ---------------------------------------------------------------------------------------------
# The ops (signatures of the attn op contract)
# ---------------------------------------------------------------------------------------------

def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """``attn::store_kvcache`` with the first cache-store op torch_npu offers. No host sync."""
    impl = lowering.available_store_impl()
    if impl is None:
        raise RuntimeError("store_kvcache: no torch_npu cache-store op is registered "
                           "(npu_scatter_pa_kv_cache / _npu_reshape_and_cache / "
                           "npu_scatter_nd_update_)")
    store_kvcache_with(impl, key, value, k_cache, v_cache, slot_mapping)


def store_kvcache_with(impl: str, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """``attn::store_kvcache`` through one named op of ``lowering.STORE_IMPLS``."""
    if key.shape[0] == 0:
        return
    lowering.store(key, value, k_cache, v_cache, slot_mapping, impl, k_cache.shape[1])


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
            causal: bool = True, block_table: torch.Tensor | None = None, window_left: int = -1,
            softcap: float = 0.0, return_lse: bool = False):
    """``attn::prefill`` (``prefill_with_lse`` with ``return_lse``) as one FIA v2 TND call.
    Copies the cu_seqlens to the host (one sync).

    q ``[Tq, H, D]``; k/v ``[Tk, Hkv, D]`` or the paged caches. Rows past ``cu_seqlens_q[-1]``
    (padding) are not sent to FIA and come back zero (LSE -inf), as do all rows when no sequence
    has a query, and rows that see no key (what FIA writes there is undocumented).
    """
    tq, h, d = q.shape
    paged = block_table is not None
    hkv = k.shape[2] if paged else k.shape[1]
    spec = lowering.prefill_spec(h, hkv, d, k.shape[1] if paged else 0, scale, causal,
                                 window_left, softcap)
    if cu_seqlens_q.shape[0] < 2 or tq == 0:
        return _nothing_seen(q, return_lse)
    q_ends, kv_lens = lowering.prefill_host_lengths(cu_seqlens_q, cu_seqlens_k, paged)
    used = q_ends[-1]
    if used == 0:
        return _nothing_seen(q, return_lse)
    if not paged:
        k, v = k[:kv_lens[-1]], v[:kv_lens[-1]]
    mask = lowering.compressed_causal_mask(q.device) if spec.sparse_mode else None
    res = lowering.prefill_fia(q[:used], k, v, block_table, mask, q_ends, kv_lens,
                               dataclasses.replace(spec, return_lse=return_lse))
    out, lse = res if return_lse else (res, None)
    empty = _keyless_rows(q_ends, kv_lens, paged, causal)
    if empty:  # host ints already: one small copy, only when such rows exist
        rows = torch.tensor(empty, dtype=torch.long, device=q.device)
        out = out.index_fill(0, rows, 0)
        lse = None if lse is None else lse.index_fill(0, rows, float("-inf"))
    if used < tq:
        out = torch.cat([out, out.new_zeros(tq - used, h, d)])
        if lse is not None:
            lse = torch.cat([lse, lse.new_full((tq - used, h), float("-inf"))])
    return (out, lse) if return_lse else out


def _keyless_rows(q_ends: list, kv_lens: list, paged: bool, causal: bool) -> list[int]:
    """Rows that see no key: every row of a sequence without keys and, causal (bottom-right),
    the first ``Lq - Lk`` rows of a sequence with more queries than keys. A left window never
    empties a row (it keeps the diagonal key)."""
    rows, q0, k0 = [], 0, 0
    for q1, kv in zip(q_ends, kv_lens):
        lq, lk = q1 - q0, (kv if paged else kv - k0)
        blind = lq if lk == 0 else (max(lq - lk, 0) if causal else 0)
        rows.extend(range(q0, q0 + blind))
        q0, k0 = q1, (k0 if paged else kv)
    return rows


def _nothing_seen(q: torch.Tensor, return_lse: bool):
    out = torch.zeros_like(q)
    if not return_lse:
        return out
    return out, torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens_k: torch.Tensor,
           block_table: torch.Tensor, scale: float, window_left: int = -1,
           softcap: float = 0.0, return_lse: bool = False):
    """``attn::decode`` (``decode_with_lse`` with ``return_lse``: lse float32 ``[B, H]``) as one
    FIA v2 BNSD call. Copies ``seqlens_k`` to the host (one sync)."""
    b, h, d = q.shape
    spec = lowering.decode_spec(h, k_cache.shape[2], d, k_cache.shape[1], scale, window_left,
                                softcap)
    if b == 0:
        return _nothing_seen(q, return_lse)
    return lowering.decode_fia(q, k_cache, v_cache, seqlens_k, block_table, seqlens_k.tolist(),
                               dataclasses.replace(spec, return_lse=return_lse))
