"""Attention of one query per sequence over a static KV cache as ``attn.decode`` (no cache copy).

A model with a static cache (gpt-fast's ``KVCache``, transformers' ``StaticCache``) writes the
new token's K/V at ``pos`` and then runs SDPA over the *whole* cache, ``[B, Hkv, S_max, D]``,
with a mask that hides keys past ``pos``: it reads all ``S_max`` keys where ``pos + 1`` matter.
A dense cache is a paged cache with one block of ``S_max`` tokens per sequence, so the same
attention is ``attn.decode`` with ``block_table = arange(B)[:, None]`` and
``seqlens_k = pos + 1``, reading only the valid prefix. The cache is handed over as a view:
when it is token-major in memory (``[B, S_max, Hkv, D]``, seen by SDPA through
``.transpose(1, 2)``), ``k.transpose(1, 2)`` is exactly the ``[num_blocks, block_size, Hkv, D]``
the op reads. :func:`graph_passes.rewrite.eligibility.refuse_decode_reason` checks that.

``seqlens_k`` is computed on the device from the position tensor (no host sync; a new position
needs no recompile) and clamped to ``[0, S_max]``: a position past the cache then sees every
key, as the mask would, and never a key out of the cache.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

import attn_ops  # noqa: F401  (registers torch.ops.attn.*)
from graph_passes.fx_nodes import meta_val
from graph_passes.rewrite.dense_prefill import Emitter

aten = torch.ops.aten
DECODE = torch.ops.attn.decode.default


def emit_cache_decode(graph: Graph, anchor: Node, q: Node, k: Node, v: Node, pos: Node,
                      scale: float, check_mask: Node | None = None) -> Node:
    """Insert ``attn.decode`` for SDPA ``anchor`` before it; return the ``[B, H, 1, D]`` node.

    Args:
        q: ``[B, H, 1, D]``; k, v: ``[B, Hkv, S, D]`` views of token-major caches.
        pos: a 1-D integer tensor whose first element is the query's position.
        scale: multiplies q·k.
        check_mask: a bool mask ``[..., 1, S]`` proven equal to ``arange(S) <= pos[0]`` only
            under an assumption about a buffer's data: an async assert checks it at every call
            (one comparison of S bools, no host sync).
    """
    emit = Emitter(graph, anchor, q)
    b = emit.size(q, 0)
    s = meta_val(k).shape[2]
    device = meta_val(q).device
    first = emit(aten.slice.Tensor, pos, 0, 0, 1)
    lengths = emit(aten.clamp.default, emit(aten.add.Tensor, first, 1), 0, s)
    lengths = emit(aten._to_copy.default, lengths, dtype=torch.int32)
    seqlens = emit(aten.repeat.default, lengths, [b])
    table = emit(aten.view.default,
                 emit(aten.arange.default, b, dtype=torch.int32, device=device), [b, 1])
    if check_mask is not None:
        kv_index = emit(aten.arange.default, s, device=device)
        expected = emit(aten.le.Tensor, emit(aten.view.default, kv_index, [1, s]),
                        emit(aten.view.default, first, [1, 1]))
        same_mask = emit(aten.all.default, emit(aten.eq.Tensor, check_mask, expected))
        emit(aten._assert_async.msg, same_mask,
             f"graph_passes: the mask {check_mask.name} read from a buffer is not 'key j iff j "
             f"<= position' at this call, so the attn.decode that replaced this attention "
             f"would be wrong (compile with options {{'attn_ops.checked_masks': False}} to "
             f"keep such calls on SDPA)")
    out = emit(DECODE, emit(aten.select.int, q, 2, 0), emit(aten.transpose.int, k, 1, 2),
               emit(aten.transpose.int, v, 1, 2), seqlens, table, float(scale))
    return emit(aten.unsqueeze.default, out, 2)
