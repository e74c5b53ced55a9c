"""Attention over a static KV cache as ``attn.decode`` / paged ``attn.prefill`` (no cache copy).

A model with a static cache (gpt-fast's ``KVCache``, transformers' ``StaticCache``) writes the
new tokens' K/V at ``pos`` and then runs SDPA over the *whole* cache, ``[B, Hkv, S_max, D]``,
with a mask that hides, for query i, the keys past ``pos[i]``: it reads all ``S_max`` keys
where ``pos + 1`` matter. A dense cache is a paged cache with one block of ``S_max`` tokens per
sequence, so the same attention is, with ``block_table = arange(B)[:, None]``:

* one query per sequence: ``attn.decode`` with ``seqlens_k = pos[0] + 1``;
* ``Sq`` queries at consecutive positions ``pos[0] + i`` (a prefill chunk): ``attn.prefill``
  with ``Sq`` queries and ``pos[0] + Sq`` keys per sequence, causal (bottom-right: query i sees
  keys ``<= pos[0] + i``). Positions given one per query are data, so "consecutive" is checked
  on the device at every call (an async assert over ``Sq`` ints: no host sync; other positions
  raise); positions built as ``offset + arange(Sq)`` (transformers) are consecutive already.

The cache is handed over as a view, never copied: ``k.transpose(1, 2)`` is the
``[num_blocks, block_size, Hkv, D]`` the ops read, one block per sequence. Token-major in memory
(``[B, S_max, Hkv, D]``, seen by SDPA through ``.transpose(1, 2)``) makes it contiguous;
heads-major (gpt-fast's and transformers' ``[B, Hkv, S_max, D]`` buffers) a strided view, which
the ops read through its strides (a backend that cannot says so in ``supports()``, and
:func:`graph_passes.rewrite.eligibility.refuse_cache_reason` leaves the call alone). Key counts are
computed on the device from the positions (a new position needs no recompile) and clamped to
``[0, S_max]``: a position past the cache sees every key, as the mask would, never one outside.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

import attn_ops  # noqa: F401  (registers torch.ops.attn.*)
from graph_passes.fx_nodes import meta_val, same
from graph_passes.rewrite.dense_prefill import Emitter

aten = torch.ops.aten
DECODE = torch.ops.attn.decode.default
PREFILL = torch.ops.attn.prefill.default


def _assert(emit: Emitter, ok: Node, message: str) -> None:
    emit(aten._assert_async.msg, emit(aten.all.default, ok), f"graph_passes: {message}")


def emit_cache_attention(graph: Graph, anchor: Node, q: Node, k: Node, v: Node, pos: Node,
                         scale: float, kind: str = "each",
                         check_mask: Node | None = None, window_left: int = -1,
                         softcap: float = 0.0) -> Node:
    """Insert the op for SDPA ``anchor`` before it; return its ``[B, H, Sq, D]`` node.

    Args:
        q: ``[B, H, Sq, D]``; k, v: ``[B, Hkv, S, D]`` caches (any memory order, head dim
            with stride 1).
        pos: the integer positions input; query i is at ``pos[i]`` (``kind`` "each"), ``pos[0]``
            ("first", one query) or ``pos + i`` ("offset", ``pos`` 0-d or one element): see
            :class:`graph_passes.mask.causal_mask.CacheMask`.
        scale: multiplies q·k.
        window_left: query i also stops seeing keys before its position - window_left.
        softcap: ``c > 0`` caps the scaled scores at ``c * tanh(s / c)`` (0: none).
        check_mask: a bool mask ``[..., Sq, S]`` proven equal to ``arange(S) <= pos[i]`` only
            under an assumption about a buffer's data: an async assert checks it at every call
            (one comparison of Sq x S bools, no host sync).
    """
    emit = Emitter(graph, anchor, q)
    b, h, sq, d = (emit.size(q, i) for i in range(4))
    s = meta_val(k).shape[2]
    device = meta_val(q).device
    flat = emit(aten.reshape.default, pos, [-1])
    first = emit(aten.slice.Tensor, flat, 0, 0, 1)  # [1]: the position of query 0
    rows = flat if kind == "each" else first  # the position of each query (or of all)
    if kind == "offset" and not same(sq, 1):
        rows = emit(aten.add.Tensor, emit(aten.arange.default, sq, device=device), first)
    # One check per (mask, positions) in a graph: a model's layers share the mask, and each
    # check is a reduction + assert kernel (4 layers of the H200 gpt-fast step: 1.027-1.056x the
    # op-by-hand time with one check per layer).
    checked = check_mask.meta.setdefault("attn_ops_checked", set()) if check_mask is not None \
        else set()
    check_key = (pos.name, kind, str(sq), int(window_left))
    if check_mask is not None and check_key not in checked:
        checked.add(check_key)
        keys = emit(aten.view.default, emit(aten.arange.default, s, device=device), [1, s])
        at = emit(aten.view.default, rows, [-1, 1])
        expected = emit(aten.le.Tensor, keys, at)
        if window_left >= 0:
            expected = emit(aten.logical_and.default, expected,
                            emit(aten.le.Scalar, emit(aten.sub.Tensor, at, keys), window_left))
        _assert(emit, emit(aten.eq.Tensor, check_mask, expected),
                f"the mask {check_mask.name} read from a buffer is not 'key j iff j <= position' "
                f"at this call, so the op that replaced this attention would be wrong (compile "
                f"with options {{'attn_ops.checked_masks': False}} to keep such calls on SDPA)")
    kv_len = emit(aten._to_copy.default,
                  emit(aten.clamp.default, emit(aten.add.Tensor, first, sq), 0, s),
                  dtype=torch.int32)
    table = emit(aten.view.default,
                 emit(aten.arange.default, b, dtype=torch.int32, device=device), [b, 1])
    k_cache, v_cache = emit(aten.transpose.int, k, 1, 2), emit(aten.transpose.int, v, 1, 2)
    if same(meta_val(q).shape[2], 1):
        out = emit(DECODE, emit(aten.select.int, q, 2, 0), k_cache, v_cache,
                   emit(aten.repeat.default, kv_len, [b]), table, float(scale), int(window_left),
                   *((float(softcap),) if softcap else ()))
        return emit(aten.unsqueeze.default, out, 2)
    if kind == "each":  # consecutive by construction for "offset"; data for "each"
        steps = emit(aten.arange.default, sq, device=device)
        _assert(emit, emit(aten.eq.Tensor, flat, emit(aten.add.Tensor, steps, first)),
                f"the positions {pos.name} are not consecutive at this call, so the paged "
                f"prefill that replaced this attention over the cache would be wrong")
    batch = emit(aten.arange.default, emit.add(b, 1), dtype=torch.int32, device=device)
    tokens_major = emit(aten.reshape.default, emit(aten.transpose.int, q, 1, 2),
                        [emit.mul(b, sq), h, d])
    out = emit(PREFILL, tokens_major, k_cache, v_cache, emit(aten.mul.Tensor, batch, sq),
               emit(aten.mul.Tensor, batch, kv_len), sq, s, float(scale), True, table,
               int(window_left), *((float(softcap),) if softcap else ()))
    return emit(aten.transpose.int, emit(aten.view.default, out, [b, sq, h, d]), 1, 2)
