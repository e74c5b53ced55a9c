"""The Ascend lowering of the attn ops: which torch_npu op, with which layout, lengths and mask.

This module is the single description of how ``attn::store_kvcache / prefill / decode`` map onto
torch_npu (docs/npu.md gives the reasoning and the torch_npu 2.13 facts it rests on). The same
functions run in two ways:

* eagerly, from :mod:`attn_ops.backends.npu`, with lengths as host ``list[int]``;
* symbolically, from :mod:`.torchair_decompose`, with ``torch.fx.Proxy`` arguments and
  lengths as lists of graph inputs (SymInt placeholders), which writes the very same calls into an
  FX graph as visible ``torch.ops.npu`` nodes.

So the functions here branch only on static facts (the :class:`FiaSpec`), never on tensor values,
and read no shapes from their tensor arguments. torch_npu is never imported: the ops are looked up
in ``torch.ops.npu`` / ``torch.ops.atb`` when called (a tensor on an ``npu`` device implies that
torch_npu is loaded; the tests register a CPU emulator of these ops instead).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

FIA_V2 = "npu_fused_infer_attention_score_v2"
# Cache-store ops in order of preference, as (namespace, op name).
STORE_IMPLS = (("npu", "npu_scatter_pa_kv_cache"),
               ("atb", "_npu_reshape_and_cache"),
               ("npu", "npu_scatter_nd_update_"))
# FIA sparse modes (torch_npu docs): 0 = no mask, 3 = bottom-right causal, 4 = band.
SPARSE_NONE, SPARSE_CAUSAL_BOTTOM_RIGHT, SPARSE_BAND = 0, 3, 4
# The compressed mask that sparse modes 2-4 take: (2048, 2048), 1 / True = masked out.
COMPRESSED_MASK_SIZE = 2048
# FIA's "no limit" value of pre_tokens / next_tokens.
INT32_MAX = 2147483647


# ---------------------------------------------------------------------------------------------
# Finding the torch_npu ops (at call time, never at import)
# ---------------------------------------------------------------------------------------------

def lookup_op(namespace: str, name: str):
    """``torch.ops.<namespace>.<name>.default``, or None when this process has no such op."""
    try:
        return getattr(getattr(torch.ops, namespace), name).default
    except (AttributeError, RuntimeError):
        return None


def require_op(namespace: str, name: str):
    """Like :func:`lookup_op`, but a RuntimeError naming the requirement when the op is missing."""
    op = lookup_op(namespace, name)
    if op is None:
        raise RuntimeError(f"the npu backend needs torch.ops.{namespace}.{name} (torch_npu with "
                           f"CANN); it is not registered in this process")
    return op


def fia_op():
    """The FIA v2 OpOverload."""
    return require_op("npu", FIA_V2)


def available_store_impl(lookup=lookup_op) -> str | None:
    """Name of the first cache-store op of :data:`STORE_IMPLS` that exists, or None."""
    for namespace, name in STORE_IMPLS:
        if lookup(namespace, name) is not None:
            return name
    return None


# ---------------------------------------------------------------------------------------------
# Static facts of one FIA call
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FiaSpec:
    """Everything static about one FIA v2 call (host ints and floats, read off shapes and args).

    ``block_size`` is 0 when the keys are not paged. ``pre_tokens`` / ``next_tokens`` matter only
    with ``sparse_mode`` 4 (band), counted from the bottom-right diagonal. ``return_lse`` asks FIA
    for its ``softmax_lse`` (fp32, natural log; ``(T, N, 1)`` in TND, ``(B, N, S, 1)`` in BNSD)
    and makes :func:`prefill_fia` / :func:`decode_fia` return ``(out, lse)``.
    """
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    scale: float
    sparse_mode: int = SPARSE_NONE
    pre_tokens: int = INT32_MAX
    next_tokens: int = INT32_MAX
    return_lse: bool = False


def prefill_spec(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, scale: float,
                 causal: bool, window_left: int, softcap: float) -> FiaSpec:
    """The FIA v2 TND call that computes ``attn::prefill`` (block_size 0: keys not paged).

    Causal without window: sparse_mode 3 (bottom-right causal, the contract's alignment). A left
    window w: sparse_mode 4 (band from the bottom-right diagonal) with ``pre_tokens = w`` and
    ``next_tokens = 0`` (causal) or unlimited (not causal).
    """
    _check_no_softcap(softcap)
    mode, pre, nxt = SPARSE_NONE, INT32_MAX, INT32_MAX
    if window_left >= 0:
        mode, pre, nxt = SPARSE_BAND, int(window_left), (0 if causal else INT32_MAX)
    elif causal:
        mode = SPARSE_CAUSAL_BOTTOM_RIGHT
    return FiaSpec(num_heads, num_kv_heads, head_dim, block_size, float(scale), mode, pre, nxt)


def decode_spec(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, scale: float,
                window_left: int, softcap: float) -> FiaSpec:
    """The FIA v2 BNSD call (query length 1, paged keys) that computes ``attn::decode``."""
    _check_no_softcap(softcap)
    if window_left >= 0:
        raise ValueError(f"window_left: the npu decode cannot apply a sliding window (got "
                         f"{window_left}); FIA v2 ignores sparse_mode / pre_tokens when the query "
                         f"length is 1. Use window_left=-1 or another backend")
    return FiaSpec(num_heads, num_kv_heads, head_dim, block_size, float(scale))


def _check_no_softcap(softcap: float) -> None:
    if softcap > 0:
        raise ValueError(f"softcap: FIA v2 has no logit soft-capping (got {softcap}); use "
                         f"softcap=0.0 or another backend")


# ---------------------------------------------------------------------------------------------
# The compressed causal mask
# ---------------------------------------------------------------------------------------------

def build_compressed_causal_mask(like: torch.Tensor) -> torch.Tensor:
    """``(2048, 2048)`` bool on ``like``'s device, True strictly above the diagonal (= masked)."""
    size = (COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE)
    return like.new_ones(size, dtype=torch.bool).triu(1)


@functools.lru_cache(maxsize=8)
def _mask_on(device: torch.device) -> torch.Tensor:
    return build_compressed_causal_mask(torch.empty(0, device=device))


def compressed_causal_mask(device: torch.device) -> torch.Tensor:
    """The compressed mask, built once per device (4 MiB; rebuilding it per call would cost a
    fill and a triu kernel per layer). Read-only by convention: FIA never writes it."""
    return _mask_on(torch.device(device))


# ---------------------------------------------------------------------------------------------
# Lengths on the host (torch_npu takes them as SymInt[] lists)
# ---------------------------------------------------------------------------------------------

def q_ends_from_cu(cu_q: list[int]) -> list[int]:
    """TND ``actual_seq_qlen``: the cumulative ends ``cu_seqlens_q[1:]``."""
    return list(cu_q[1:])


def kv_lens_from_cu(cu_k: list[int], paged: bool) -> list[int]:
    """TND ``actual_seq_kvlen``: cumulative ends without a block table, per-request lengths with."""
    if paged:
        return [b - a for a, b in zip(cu_k, cu_k[1:])]
    return list(cu_k[1:])


def prefill_host_lengths(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         paged: bool) -> tuple[list[int], list[int]]:
    """``(actual_seq_qlen, actual_seq_kvlen)`` of a prefill, read with ONE device-to-host copy.

    This is the host sync the npu backend accepts because torch_npu requires host lists; both
    cu_seqlens are concatenated first so that it costs one transfer, not two.
    """
    both = torch.cat([cu_seqlens_q, cu_seqlens_k]).tolist()
    n = cu_seqlens_q.shape[0]
    return q_ends_from_cu(both[:n]), kv_lens_from_cu(both[n:], paged)


# ---------------------------------------------------------------------------------------------
# The lowering (no value-dependent branches: it also runs on fx Proxies)
# ---------------------------------------------------------------------------------------------

def prefill_fia(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                block_table: torch.Tensor | None, mask: torch.Tensor | None, q_ends: list,
                kv_lens: list, spec: FiaSpec) -> torch.Tensor:
    """FIA v2 in TND layout. Returns ``[q_ends[-1], H, D]``.

    Args:
        q: ``[q_ends[-1], H, D]`` fp16/bf16: exactly the rows the sequences own (FIA requires the
            token count to equal the last cumulative length; slice padded tails off first).
        k, v: ``[kv_ends[-1], Hkv, D]`` when ``spec.block_size == 0``; else the paged caches
            ``[num_blocks, block_size, Hkv, D]``, passed to FIA viewed as
            ``[num_blocks, block_size, Hkv*D]`` (a 4-D cache would be read as
            ``[num_blocks, Hkv, block_size, D]``).
        block_table: ``[B, max_blocks]`` int (cast to int32) when paged, else None.
        mask: the compressed causal mask when ``spec.sparse_mode`` is 3 or 4, else None.
        q_ends: B cumulative query ends (``cu_seqlens_q[1:]``), host ints or SymInts.
        kv_lens: B cumulative key ends, or, when paged, B per-request key lengths.

    With ``spec.return_lse``: ``(out, lse [q_ends[-1], H])`` (FIA's TND ``(T, N, 1)`` squeezed).
    """
    paged = spec.block_size > 0
    if paged:
        k, v = k.flatten(2), v.flatten(2)
        block_table = block_table.to(torch.int32)
    out, lse = fia_op()(
        q, k, v, atten_mask=mask, actual_seq_qlen=list(q_ends), actual_seq_kvlen=list(kv_lens),
        block_table=block_table if paged else None, num_query_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, softmax_scale=spec.scale,
        pre_tokens=spec.pre_tokens, next_tokens=spec.next_tokens, input_layout="TND",
        sparse_mode=spec.sparse_mode, block_size=spec.block_size, **_lse_flag(spec))
    return (out, lse[:, :, 0]) if spec.return_lse else out


def decode_fia(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               seqlens_k: torch.Tensor, block_table: torch.Tensor, kv_lens: list,
               spec: FiaSpec) -> torch.Tensor:
    """FIA v2 in BNSD layout, one query per sequence, paged keys. Returns ``[B, H, D]``.

    ``q [B, H, D]`` is viewed ``[B, H, 1, D]``; the caches ``[num_blocks, block_size, Hkv*D]``;
    ``kv_lens`` are the B values of ``seqlens_k`` (host ints or SymInts). Rows with
    ``seqlens_k == 0`` are set to zero here (LSE -inf): what FIA writes for a zero-length
    request is not documented. With ``spec.return_lse``: ``(out, lse [B, H])`` (FIA's BNSD
    ``(B, N, 1, 1)`` squeezed).
    """
    out, lse = fia_op()(
        q.unsqueeze(2), k_cache.flatten(2), v_cache.flatten(2), actual_seq_kvlen=list(kv_lens),
        block_table=block_table.to(torch.int32), num_query_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, softmax_scale=spec.scale, input_layout="BNSD",
        block_size=spec.block_size, **_lse_flag(spec))
    seen = seqlens_k > 0
    out = torch.where(seen[:, None, None], out.squeeze(2), 0)
    if not spec.return_lse:
        return out
    return out, torch.where(seen[:, None], lse[:, :, 0, 0], float("-inf"))


def _lse_flag(spec: FiaSpec) -> dict:
    """``return_softmax_lse=True`` only when asked (the call stays as before otherwise)."""
    return {"return_softmax_lse": True} if spec.return_lse else {}


def redirect_padding_rows(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, slot_mapping: torch.Tensor):
    """Rows with slot -1 rewritten, without a host sync, so every slot is a valid one.

    torch_npu's scatter ops document slots in ``[0, num_blocks * block_size)``; the rewrite is
    the reference store's (:func:`attn_ops.backends.reference.redirect_padding`). Returns
    ``(key, value, slots)`` with ``slots`` int64 ``[T]``; needs ``T >= 1``.
    """
    from attn_ops.backends.reference import redirect_padding
    plan = redirect_padding(slot_mapping)
    # The caches here are contiguous (supports()); a flat read keeps the graph free of the
    # reference's layout branch (torchair traces this function symbolically).
    flat = lambda cache, slots: cache.flatten(0, 1).index_select(0, slots)  # noqa: E731
    return plan.rows(key, k_cache, flat), plan.rows(value, v_cache, flat), plan.index


def store(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
          slot_mapping: torch.Tensor, impl: str, block_size: int) -> None:
    """Scatter ``key/value [T, Hkv, D]`` into the caches ``[nb, block_size, Hkv, D]`` with ``impl``.

    ``impl`` is one of the names in :data:`STORE_IMPLS`. ``npu_scatter_pa_kv_cache`` is called
    with ``cache_mode="Norm"`` (its default "PA_NZ" expects the FRACTAL_NZ cache layout);
    ``npu_scatter_nd_update_`` writes ``[nb, block_size, Hkv*D]`` views at (block, offset) pairs.
    ``scatter_update_`` is deliberately not used: its 1-D indices are per-batch offsets, not flat
    slots. Needs ``T >= 1``.
    """
    key, value, slots = redirect_padding_rows(key, value, k_cache, v_cache, slot_mapping)
    if impl == "npu_scatter_pa_kv_cache":
        require_op("npu", impl)(key, value, k_cache, v_cache, slots, cache_mode="Norm")
    elif impl == "_npu_reshape_and_cache":
        require_op("atb", impl)(key, value, k_cache, v_cache, slots.to(torch.int32))
    elif impl == "npu_scatter_nd_update_":
        op = require_op("npu", impl)
        index = torch.stack([slots // block_size, slots % block_size], dim=1)
        op(k_cache.flatten(2), index, key.flatten(1))
        op(v_cache.flatten(2), index, value.flatten(1))
    else:
        raise ValueError(f"impl: expected one of {[n for _, n in STORE_IMPLS]}, got {impl!r}")
