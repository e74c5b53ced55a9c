"""Dense ``[B, H, S, D]`` attention as ``attn.prefill`` on tokens-major (THD) views.

Every sequence of a dense batch has the same length S, so the varlen metadata is a function of
the shapes alone: ``cu_seqlens = arange(B + 1, int32) * S`` built in the graph (no host sync,
symbolic under dynamic shapes), ``max_seqlen = S``. q ``[B, H, Sq, D]`` becomes
``q.transpose(1, 2).reshape(B * Sq, H, D)`` (a view when q came from ``view(B, S, H, D)
.transpose(1, 2)``, as in most models) and the output goes back the same way, as a
``[B, H, Sq, D]`` view of a ``[B, Sq, H, D]`` tensor, which is the layout the usual
``out.transpose(1, 2).reshape(B, S, H * D)`` that follows wants. Under Inductor the THD views
cost nothing: the op's inputs keep their traced strides, so RoPE's kernel writes q and k where
the op reads them, v stays a strided view of the projection, and the output feeds the next
matmul in place (checked on the generated code by
tests/graph_passes/passes/test_sdpa_to_prefill.py); the one added kernel writes cu_seqlens,
when Inductor does not fuse that into a producer.

:func:`dense_prefill` is the eager form (the pattern passes trace it as their replacement);
:func:`emit_dense_prefill` writes the same ops into an existing FX graph, in aten, with fake
values on every new node, for the SDPA pass and the export pass.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

import attn_ops  # noqa: F401  (registers torch.ops.attn.*)
from graph_passes.fx_nodes import meta_val, same

aten = torch.ops.aten
PREFILL = torch.ops.attn.prefill.default


def dense_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  causal: bool, window_left: int = -1) -> torch.Tensor:
    """``softmax(q k^T * scale [+ causal mask]) v`` through ``attn.prefill``.

    Args:
        q: ``[B, H, Sq, D]``; k, v: ``[B, Hkv, Sk, D]`` with ``H % Hkv == 0`` (query head h reads
            kv head ``h // (H // Hkv)``), fp32/fp16/bf16.
        scale: multiplies q·k.
        causal: query i sees keys ``j <= i`` (callers guarantee Sq == Sk).

    Returns:
        ``[B, H, Sq, D]`` in q's dtype (a transposed view of a contiguous ``[B, Sq, H, D]``).
    """
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=q.device) * sq
    cu_k = cu_q if same(sq, sk) else torch.arange(b + 1, dtype=torch.int32, device=q.device) * sk
    out = PREFILL(q.transpose(1, 2).reshape(b * sq, h, d),
                  k.transpose(1, 2).reshape(b * sk, hkv, d),
                  v.transpose(1, 2).reshape(b * sk, hkv, d), cu_q, cu_k, sq, sk, scale, causal,
                  *((None, window_left) if window_left >= 0 else ()))
    return out.view(b, sq, h, d).transpose(1, 2)


class Emitter:
    """Inserts aten nodes before ``anchor`` and records each one's fake value."""

    def __init__(self, graph: Graph, anchor: Node, like: Node):
        self.graph, self.anchor = graph, anchor
        self.keys = [k for k in ("val", "example_value") if k in like.meta] or ["val"]
        # The values' own fake mode: Dynamo's may differ from the tracing context's.
        self.fake_mode = getattr(meta_val(like), "fake_mode", None)
        self.memo: dict = {}  # size arithmetic already emitted

    def __call__(self, target, *args, **kwargs) -> Node:
        def value(x):
            return meta_val(x) if isinstance(x, Node) else x
        vargs = torch.fx.node.map_aggregate(args, value)
        vkwargs = torch.fx.node.map_aggregate(kwargs, value)
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        if self.fake_mode is not None:
            with self.fake_mode:
                val = target(*vargs, **vkwargs)
        else:
            val = target(*vargs, **vkwargs)
        for key in self.keys:
            node.meta[key] = val
        node.meta["stack_trace"] = self.anchor.meta.get("stack_trace")
        return node

    def size(self, tensor: Node, dim: int):
        """A static int, or a ``sym_size`` node for a symbolic size."""
        s = meta_val(tensor).shape[dim]
        return s if isinstance(s, int) else self(aten.sym_size.int, tensor, dim)

    def _sym(self, fn, a, b):
        if isinstance(a, int) and isinstance(b, int):
            return fn(a, b)
        if (fn, a, b) not in self.memo:
            self.memo[(fn, a, b)] = self(fn, a, b)
        return self.memo[(fn, a, b)]

    def mul(self, a, b):
        return self._sym(operator.mul, a, b)

    def add(self, a, b):
        return self._sym(operator.add, a, b)


def emit_dense_prefill(graph: Graph, anchor: Node, q: Node, k: Node, v: Node, scale: float,
                       causal: bool, window_left: int = -1) -> Node:
    """Insert :func:`dense_prefill` of nodes ``q``, ``k``, ``v`` before ``anchor``; return its node.

    The nodes carry fake values (``meta['val']`` and/or ``meta['example_value']``, as ``q`` does),
    so the graph stays valid for export, Dynamo backends and later passes.
    """
    emit = Emitter(graph, anchor, q)
    b, h, sq, d = (emit.size(q, i) for i in range(4))
    hkv = emit.size(k, 1)
    same_len = same(meta_val(q).shape[2], meta_val(k).shape[2])
    sk = sq if same_len else emit.size(k, 2)
    device = meta_val(q).device

    def tokens_major(x: Node, s, heads) -> Node:
        return emit(aten.reshape.default, emit(aten.transpose.int, x, 1, 2),
                    [emit.mul(b, s), heads, d])

    def cu(s) -> Node:
        steps = emit(aten.arange.default, emit.add(b, 1), dtype=torch.int32, device=device)
        return emit(aten.mul.Tensor, steps, s)

    cu_q = cu(sq)
    cu_k = cu_q if same_len else cu(sk)
    out = emit(PREFILL, tokens_major(q, sq, h), tokens_major(k, sk, hkv), tokens_major(v, sk, hkv),
               cu_q, cu_k, sq, sk, float(scale), bool(causal),
               *((None, int(window_left)) if window_left >= 0 else ()))
    return emit(aten.transpose.int, emit(aten.view.default, out, [b, sq, h, d]), 1, 2)
