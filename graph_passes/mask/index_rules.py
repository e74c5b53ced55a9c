"""How views, slices and indexing act on the abstract mask values of :mod:`.domain`.

Views that keep every index (size-1 dims added or dropped, ``expand``, ``permute``), slices
with a known start, advanced indexing by position tensors, and the position sequences models
build (``diff``/``cumsum``/``cat``, as in Hugging Face's packed-sequence check). ``INDEX_RULES``
has the same form as :data:`.value_rules.VALUE_RULES`; every rule is exact or refuses.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from graph_passes.fx_nodes import IDENTITY_OPS, arg, op_name, same, size_arg
from graph_passes.mask import domain as md
from graph_passes.mask.domain import Lin, NotProvable, Pred, Select
from graph_passes.mask.value_rules import const_of, shape_of

_VIEWS = frozenset({"view", "reshape", "_unsafe_view", "squeeze", "flatten"})
_EXPANDS = frozenset({"expand", "expand_as", "broadcast_to"})


def _identity(ev, node: Node):
    return ev.value(node.args[0])


def _expand(ev, node: Node):
    return ev.value(node.args[0], len(shape_of(node)))


def _reshape(ev, node: Node):
    """Views that only add or drop size-1 dims keep every index; anything else is refused."""
    src = node.args[0]
    x = ev.value(src)
    in_shape, out_shape = shape_of(src), shape_of(node)
    real_in = [i for i, s in enumerate(in_shape) if not same(s, 1)]
    real_out = [i for i, s in enumerate(out_shape) if not same(s, 1)]
    if len(real_in) != len(real_out) or not all(
            same(in_shape[i], out_shape[o]) for i, o in zip(real_in, real_out)):
        raise NotProvable(f"a view {list(in_shape)} -> {list(out_shape)} that mixes dims")
    source_of = dict(zip(real_out, real_in))
    return md.map_dims(x, lambda c: tuple(c[source_of[o]] if o in source_of else 0
                                          for o in range(len(out_shape))))


def _unsqueeze(ev, node: Node):
    x = ev.value(node.args[0])
    d = arg(node, 1, "dim")
    d = d + x.rank + 1 if d < 0 else d
    return md.map_dims(x, lambda c: tuple(c[:d]) + (0,) + tuple(c[d:]))


def _permute(ev, node: Node):
    x = ev.value(node.args[0])
    r = x.rank
    if op_name(node) == "permute":
        dims = size_arg(node, 1)
    else:
        d0, d1 = (arg(node, 1, "dim0") % r, arg(node, 2, "dim1") % r)
        dims = list(range(r))
        dims[d0], dims[d1] = d1, d0
    return md.map_dims(x, lambda c: tuple(c[d % r] for d in dims))


def _slice_dim(x, dim: int, start, step=1):
    """Keep ``start::step`` of ``dim``: index i of the result reads index ``start + i``."""
    start = 0 if start is None else start
    if not isinstance(start, (int, torch.SymInt)) or (isinstance(start, int) and start < 0):
        raise NotProvable("a slice with a negative or unknown start")
    if step != 1:
        raise NotProvable("a strided slice")

    def moved(lin: Lin) -> Lin:
        if any(onehot[dim] for _, onehot, _ in lin.terms) and not same(start, 0):
            raise NotProvable("a slice of a position input at a nonzero start")
        return Lin(lin.coef, lin.const + lin.coef[dim] * start, lin.terms)
    if isinstance(x, Lin):
        return moved(x)
    pred = x.pred if isinstance(x, Select) else x
    pred = pred.map_lins(moved)
    return Select(pred, x.a, x.b) if isinstance(x, Select) else pred


def _aten_slice(ev, node: Node):
    x = ev.value(node.args[0])
    dim = arg(node, 1, "dim", 0) % x.rank
    return _slice_dim(x, dim, ev.scalar(arg(node, 2, "start", 0)), arg(node, 4, "step", 1))


def _getitem(ev, node: Node):
    x = ev.value(node.args[0])
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, Node) for i in index):
        if Ellipsis in index:
            raise NotProvable("tensor indexing mixed with ...")
        # x[None, None, pos] is x with two new leading dims, then indexed by pos: each None
        # becomes a size-1 dim of x and a full slice of the index (gpt-fast's mask row).
        full = slice(None, None, None)
        for d, i in enumerate(index):
            if i is None:
                x = md.map_dims(x, lambda c, d=d: tuple(c[:d]) + (0,) + tuple(c[d:]))
        index = [full if i is None else i for i in index]
        return _advanced_index(ev, x, index + [full] * (x.rank - len(index)))
    if sum(1 for i in index if i is Ellipsis) > 1:
        raise NotProvable("an index with several ellipses")
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    if Ellipsis in index:
        e = index.index(Ellipsis)
        index = index[:e] + (slice(None),) * (x.rank - n_real) + index[e + 1:]
    dim = 0
    for i in index:
        if i is None:
            x = md.map_dims(x, lambda c, d=dim: tuple(c[:d]) + (0,) + tuple(c[d:]))
            dim += 1
        elif isinstance(i, slice):
            x = _slice_dim(x, dim, ev.scalar(i.start), 1 if i.step is None else i.step)
            dim += 1
        else:
            raise NotProvable("integer or tensor indexing of a mask")
    return x


def _diff(ev, node: Node):
    """``torch.diff(x, dim=d, prepend=p)`` of positions ``x``: the constant step along d.

    With ``prepend``, the first element is ``x[0] - p``, which is the same step only when p is
    exactly x's value one step before its start (Hugging Face's ``position_ids[:, :1] - 1``).
    """
    if arg(node, 1, "n", 1) != 1 or arg(node, 4, "append") is not None:
        raise NotProvable("diff with n > 1 or append")
    x = ev.value(node.args[0])
    if not isinstance(x, Lin) or x.terms:
        raise NotProvable("diff of a non-position tensor")
    dim = arg(node, 2, "dim", -1) % x.rank
    step = x.coef[dim]
    prepend = arg(node, 3, "prepend")
    if prepend is not None:
        p = ev.value(prepend, x.rank)
        if not (isinstance(p, Lin) and same(shape_of(prepend)[dim], 1)
                and all(same(a, b) for i, (a, b) in enumerate(zip(p.coef, x.coef)) if i != dim)
                and same(p.const, x.const - step)):
            raise NotProvable("diff whose prepend is not the value one step before the start")
    return Lin((0,) * x.rank, step)


def _cumsum(ev, node: Node):
    """Cumulative sum of a constant c along d: ``c * (idx_d + 1)``."""
    x = ev.value(node.args[0])
    c = const_of(x) if isinstance(x, Lin) else md.scalar_of(md.as_select(x))
    if not isinstance(c, (int, bool, torch.SymInt)) and not float(c).is_integer():
        raise NotProvable("cumsum of a non-integer constant")
    c = int(c)
    dim = arg(node, 1, "dim") % x.rank
    coef = [0] * x.rank
    coef[dim] = c
    return Lin(tuple(coef), c)


def _compose(x, pre: int, indices: list, post: int):
    """``x[(:,) * pre + indices + (:,) * post]`` for Lin index tensors (advanced indexing).

    The result's dims are pre, then the indices' broadcast dims, then post; its value at an
    index is x's formula with each indexed dim replaced by that index tensor's formula. An index
    that reads a position input (``causal_mask[input_pos]``) is taken to hold valid indices,
    ``0 <= pos < size``, as a model's positions are (a negative one would wrap around).
    """
    r = max(i.rank for i in indices)
    indices = [md.lift(i, r) for i in indices]
    for i in indices:
        if not (isinstance(i.const, int) and i.const >= 0
                and all(isinstance(c, int) and c >= 0 for c in i.coef)
                and all(c > 0 for _, _, c in i.terms)):
            raise NotProvable("an index tensor that may be negative")
    out_rank = pre + r + post
    n_idx = len(indices)

    def out_dims(c: tuple, index_part: tuple) -> tuple:
        """x's dims ``c`` (pre, indexed, post) -> the result's (pre, index dims, post)."""
        return tuple(c[:pre]) + tuple(index_part) + tuple(c[pre + n_idx:])

    def remap(lin: Lin) -> Lin:
        if any(any(onehot[pre:pre + n_idx]) for _, onehot, _ in lin.terms):
            raise NotProvable("a position input indexed by another index tensor")
        coef = list(out_dims(lin.coef, (0,) * r))
        const = lin.const
        terms = [(n, out_dims(o, (0,) * r), c) for n, o, c in lin.terms]
        for k, idx in enumerate(indices):
            c = lin.coef[pre + k]
            for j in range(r):
                coef[pre + j] = coef[pre + j] + c * idx.coef[j]
            const = const + c * idx.const
            terms += [(n, (0,) * pre + tuple(o) + (0,) * post, c * t) for n, o, t in idx.terms]
        return Lin(tuple(coef), const, md.merge_terms(terms))
    if isinstance(x, Lin):
        return remap(x)
    pred = x.pred if isinstance(x, Select) else x
    pred = Pred(out_rank, None, pred.value) if pred.lin is None else Pred(
        out_rank, remap(pred.lin), True, tuple(remap(m) for m in pred.more))
    return Select(pred, x.a, x.b) if isinstance(x, Select) else pred


def _advanced_index(ev, x, index: list):
    """Indexing by tensors (None / full slices elsewhere); the tensors must be adjacent."""
    full = slice(None, None, None)
    tensor_pos = [i for i, e in enumerate(index) if isinstance(e, Node)]
    first, last = tensor_pos[0], tensor_pos[-1]
    if last - first + 1 != len(tensor_pos) or any(
            not (e is None or e == full) for i, e in enumerate(index) if i not in tensor_pos):
        raise NotProvable("indexing that mixes tensors with other index kinds")
    indices = [ev.value(index[i]) for i in tensor_pos]
    if not all(isinstance(i, Lin) for i in indices):
        raise NotProvable("indexing by a non-position tensor")
    return _compose(x, first, indices, x.rank - last - 1)


def _cat(ev, node: Node):
    """``cat`` of position tensors that continue one formula along the dim (diff's prepend)."""
    parts = list(arg(node, 0, "tensors"))
    rank = len(shape_of(node))
    dim = arg(node, 1, "dim", 0) % rank
    values = [ev.value(p, rank) for p in parts]
    sizes = [shape_of(p)[dim] for p in parts]
    if not all(isinstance(v, Lin) and not v.terms for v in values):
        raise NotProvable("cat of non-position tensors")
    steps = [v.coef[dim] for v, n in zip(values, sizes) if not same(n, 1)]
    step = steps[0] if steps else values[1].const - values[0].const if len(values) > 1 else 0
    first = values[0]
    coef = tuple(step if i == dim else c for i, c in enumerate(first.coef))
    offset = 0
    for v, n in zip(values, sizes):
        ok = same(v.const, first.const + step * offset) and all(
            same(a, b) for i, (a, b) in enumerate(zip(v.coef, coef))
            if i != dim or not same(n, 1))
        if not ok:
            raise NotProvable("cat of position tensors that do not continue one another")
        offset = offset + n
    return Lin(coef, first.const)


def _aten_index(ev, node: Node):
    x = ev.value(node.args[0])
    index = list(node.args[1]) + [None] * (x.rank - len(node.args[1]))
    return _advanced_index(ev, x, index)


INDEX_RULES = {
    **{n: _identity for n in IDENTITY_OPS},
    **{n: _expand for n in _EXPANDS},
    **{n: _reshape for n in _VIEWS},
    "unsqueeze": _unsqueeze, "permute": _permute, "transpose": _permute,
    "slice": _aten_slice, "getitem": _getitem, "index": _aten_index,
    "diff": _diff, "cumsum": _cumsum, "cat": _cat,
}
