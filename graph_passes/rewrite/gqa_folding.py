"""Fold a GQA head expansion away: the ``[B, Hkv, S, D]`` tensor a ``[B, H, S, D]`` one repeats.

Models expand K/V heads for grouped-query attention in two spellings with the same meaning
(query head h reads kv head ``h // n_rep``):

* ``repeat_kv``: ``x[:, :, None].expand(B, Hkv, n_rep, S, D).reshape(B, Hkv * n_rep, S, D)``
  (aten: ``unsqueeze(x, 2)`` -> ``expand`` -> ``clone`` -> ``view``/``reshape``);
* ``x.repeat_interleave(n_rep, dim=1)`` (Inductor decomposes it into the form above).

``attn.prefill`` takes the Hkv heads directly, so the expansion (a copy of K and V per layer)
disappears. ``x.repeat(1, n, 1, 1)`` tiles heads instead (head h reads ``h % Hkv``) and is not
folded: the call keeps the already-expanded tensor, which is still correct.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from graph_passes.fx_nodes import IDENTITY_OPS, arg, meta_val, op_name, same

_RESHAPES = frozenset({"view", "reshape", "_unsafe_view"})


def _shape(node) -> tuple | None:
    val = meta_val(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _strip_identity(node: Node) -> Node:
    """Skip value-preserving ops: clones and full-range slices (``x[:, :]`` in aten)."""
    while isinstance(node, Node):
        name = op_name(node)
        if name in IDENTITY_OPS and node.args:
            node = node.args[0]
        elif name == "slice" and _shape(node) == _shape(node.args[0]) \
                and arg(node, 2, "start", 0) in (0, None) and arg(node, 4, "step", 1) == 1:
            node = node.args[0]
        else:
            return node
    return node


def _unsqueezed_source(node: Node) -> Node | None:
    """The 4-D tensor x of ``x[:, :, None]`` / ``x.unsqueeze(2)`` (a 5-D ``[B, Hkv, 1, S, D]``)."""
    name = op_name(node)
    if name == "unsqueeze" and arg(node, 1, "dim") in (2, -4):
        return _strip_identity(node.args[0])
    if name == "getitem":
        index = node.args[1]
        full = slice(None, None, None)
        if isinstance(index, tuple) and index[:3] == (full, full, None) \
                and all(i == full or i is Ellipsis for i in index[3:]):
            return _strip_identity(node.args[0])
    return None


def unexpand(node: Node) -> tuple[Node, int] | None:
    """``(x, n_rep)`` when ``node`` is ``x`` ``[B, Hkv, S, D]`` with each head repeated n_rep times.

    Returns None when ``node`` is not such an expansion (including ``n_rep == 1``).
    """
    out_shape = _shape(node)
    if out_shape is None or len(out_shape) != 4:
        return None
    name = op_name(node)
    if name == "repeat_interleave":
        src, reps = node.args[0], arg(node, 1, "repeats")
        dim = arg(node, 2, "dim")
        src_shape = _shape(src)
        if isinstance(reps, int) and reps > 1 and dim in (1, -3) and src_shape is not None \
                and len(src_shape) == 4 and arg(node, 3, "output_size") in (None, out_shape[1]):
            return src, reps
        return None
    if name not in _RESHAPES:
        return None
    expanded = _strip_identity(node.args[0])
    if op_name(expanded) != "expand":
        return None
    exp_shape = _shape(expanded)
    src = _unsqueezed_source(_strip_identity(expanded.args[0]))
    if src is None or exp_shape is None or len(exp_shape) != 5:
        return None
    src_shape = _shape(src)
    if src_shape is None or len(src_shape) != 4:
        return None
    b, hkv, s, d = src_shape
    n_rep = exp_shape[2]
    if not isinstance(n_rep, int) or n_rep <= 1:
        return None
    expect_5d = (b, hkv, n_rep, s, d)
    expect_4d = (b, hkv * n_rep, s, d)
    if all(same(x, y) for x, y in zip(exp_shape, expect_5d)) \
            and all(same(x, y) for x, y in zip(out_shape, expect_4d)):
        return src, n_rep
    return None


def unexpand_pair(k: Node, v: Node) -> tuple[Node, Node, int]:
    """Fold K and V together (``attn.prefill`` needs equal shapes); ``(k, v, 1)`` if they differ."""
    fk, fv = unexpand(k), unexpand(v)
    if fk is not None and fv is not None and fk[1] == fv[1]:
        return fk[0], fv[0], fk[1]
    return k, v, 1
