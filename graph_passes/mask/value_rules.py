"""How value-computing ops act on the abstract mask values of :mod:`.domain`.

Creation (``arange``, ``ones``, ``full``, ...), ``tril``/``triu``, comparisons, arithmetic,
logic, ``where``/``masked_fill`` and dtype casts. ``VALUE_RULES`` maps a canonical op name
(:func:`graph_passes.fx_nodes.op_name`) to ``rule(ev, node)``, which reads the node's inputs
through ``ev.value`` / ``ev.scalar`` and returns the node's abstract value, or raises
:class:`NotProvable`. Every rule is exact: it either computes the op's value as a function of
the element index, or refuses. Views and indexing are in :mod:`.index_rules`.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from graph_passes.mask import domain as md
from graph_passes.fx_nodes import arg, meta_val, op_name, same
from graph_passes.mask import scalars
from graph_passes.mask.domain import Lin, NotProvable, Pred, Select

_CASTS = frozenset({"to", "_to_copy", "convert_element_type", "type", "type_as", "float", "bool",
                    "half", "bfloat16", "int", "long", "double"})
_FILLS = {"ones": 1, "zeros": 0, "ones_like": 1, "zeros_like": 0, "new_ones": 1, "new_zeros": 0}
_COMPARE = ("ge", "gt", "le", "lt", "eq", "ne")


def shape_of(node: Node) -> tuple:
    val = meta_val(node)
    if not isinstance(val, torch.Tensor):
        raise NotProvable(f"no tensor metadata on {node.name}")
    return tuple(val.shape)


def dtype_of(node: Node) -> torch.dtype:
    return meta_val(node).dtype


def _arange(ev, node: Node):
    if op_name(node) == "iota":
        start, step = node.kwargs.get("start", 0), node.kwargs.get("step", 1)
    else:
        pos = [ev.scalar(a) for a in node.args]
        start, step = (pos[0], 1) if len(pos) >= 2 else (0, 1)
        if len(pos) >= 3:
            step = pos[2]
        start = ev.scalar(node.kwargs.get("start", start))
        step = ev.scalar(node.kwargs.get("step", step))
    if dtype_of(node).is_floating_point:
        raise NotProvable("a floating-point arange")
    return Lin((ev.scalar(step),), ev.scalar(start))


def _fill(ev, node: Node):
    name = op_name(node)
    if name in _FILLS:
        value = _FILLS[name]
    elif name in ("full", "new_full"):
        value = ev.scalar(arg(node, 1, "fill_value"))
    elif name == "full_like":
        value = ev.scalar(arg(node, 1, "fill_value"))
    else:  # scalar_tensor, tensor
        value = ev.scalar(arg(node, 0, "s" if name == "scalar_tensor" else "data"))
        if not isinstance(value, (int, float, bool)):
            raise NotProvable("torch.tensor of a non-scalar")
    dtype = dtype_of(node)
    return md.constant(len(shape_of(node)), scalars.in_dtype(value, dtype), dtype)


def _tri(ev, node: Node):
    rank = len(shape_of(node))
    base = ev.value(node.args[0], rank)
    k = ev.scalar(arg(node, 1, "diagonal", 0))
    coef = [0] * rank
    if op_name(node) == "tril":  # keep j <= i + k   <=>  i - j + k >= 0
        coef[-2], coef[-1] = 1, -1
        pred = Pred(rank, Lin(tuple(coef), k))
    else:  # triu: keep j >= i + k  <=>  j - i - k >= 0
        coef[-2], coef[-1] = -1, 1
        pred = Pred(rank, Lin(tuple(coef), -k))
    if isinstance(base, Pred):
        return md.combine_preds("logical_and", pred, base)
    return Select(pred, const_of(base), 0.0)


def const_of(v):
    if isinstance(v, Lin):
        if not v.is_constant:
            raise NotProvable("a position-dependent value where a constant was expected")
        return v.const
    return md.scalar_of(v)


def _compare(ev, node: Node):
    name, rank = op_name(node), len(shape_of(node))
    x, y = ev.value(node.args[0], rank), ev.value(arg(node, 1, "other"), rank)
    if isinstance(x, Lin) and isinstance(y, Lin):
        if name in ("ge", "gt", "le", "lt"):
            return md.compare(name, x, y)
        diff = x + y.scale(-1)
        if diff.is_constant and isinstance(diff.const, int):
            return Pred(rank, None, (diff.const == 0) == (name == "eq"))
        raise NotProvable(f"{name} between position tensors that differ by a non-constant")
    args = (node.args[0], arg(node, 1, "other"))
    for var, other, flip in ((x, y, False), (y, x, True)):
        if isinstance(var, (Pred, Select)):
            s, c = md.as_select(var), const_of(other)

            def hit(v):  # compared in the operands' dtypes, as torch compares them
                values = (c, v) if flip else (v, c)
                return scalars.apply(getattr(torch, name),
                                     *(scalars.operand(a, u) for a, u in zip(args, values)))
            hit_a, hit_b = hit(s.a), hit(s.b)
            if hit_a == hit_b:
                return Pred(rank, None, bool(hit_a))
            return s.pred if hit_a else s.pred.negate()
    raise NotProvable(f"{name} between non-position values")


def _arith(ev, node: Node):
    name, rank = op_name(node).rstrip("_"), len(shape_of(node))
    x = ev.value(node.args[0], rank)
    if name == "neg":
        y, name = md.lift(Lin((), -1), rank), "mul"
    else:
        y = ev.value(arg(node, 1, "other"), rank)
    alpha = node.kwargs.get("alpha", 1)
    if isinstance(x, Lin) and isinstance(y, Lin):
        if name == "mul":
            if y.is_constant:
                return x.scale(y.const)
            if x.is_constant:
                return y.scale(x.const)
            raise NotProvable("a product of two position tensors")
        return x + y.scale(alpha if name == "add" else -alpha)
    if isinstance(x, Pred) and isinstance(y, Pred) and name == "mul":
        return md.combine_preds("mul", x, y)
    if op_name(node).rstrip("_") == "neg":
        s = md.as_select(x)
        neg = lambda a: scalars.apply(torch.neg, scalars.operand(node.args[0], a))  # noqa: E731
        return Select(s.pred, neg(s.a), neg(s.b))
    sx, sy = md.as_select(x), md.as_select(y)
    fn, kw = getattr(torch, name), ({} if name == "mul" else {"alpha": alpha})
    args = (node.args[0], arg(node, 1, "other"))

    def op(a, b):  # in the operands' dtypes, as torch computes it
        return scalars.apply(fn, *(scalars.operand(p, u) for p, u in zip(args, (a, b))), **kw)
    for var, other, flip in ((sx, sy, False), (sy, sx, True)):
        try:
            c = md.scalar_of(other)
        except NotProvable:
            continue
        f = (lambda a: op(c, a)) if flip else (lambda a: op(a, c))
        return Select(var.pred, f(var.a), f(var.b))
    if sx.pred.equals(sy.pred):
        return Select(sx.pred, op(sx.a, sy.a), op(sx.b, sy.b))
    raise NotProvable(f"{name} of two different masks")


def _logical(ev, node: Node):
    name, rank = op_name(node), len(shape_of(node))
    x = md.as_pred(ev.value(node.args[0], rank))
    if name in ("logical_not", "bitwise_not"):
        return x.negate()
    return md.combine_preds(name, x, md.as_pred(ev.value(node.args[1], rank)))


def _where(ev, node: Node):
    rank, dtype = len(shape_of(node)), dtype_of(node)
    cond = md.as_pred(ev.value(arg(node, 0, "condition"), rank))
    branches = (arg(node, 1, "self"), arg(node, 2, "other"))
    a, b = (scalars.convert(p, md.scalar_of(ev.value(p, rank)), dtype) for p in branches)
    if dtype == torch.bool:
        return md.as_pred(Select(cond, a, b))
    return Select(cond, a, b)


def _masked_fill(ev, node: Node):
    rank = len(shape_of(node))
    base = md.as_select(ev.value(node.args[0], rank))
    mask = md.as_pred(ev.value(arg(node, 1, "mask"), rank))
    fill = arg(node, 2, "value")
    v = scalars.convert(fill, md.scalar_of(ev.value(fill, rank)), dtype_of(node))
    try:
        return Select(mask, v, md.scalar_of(base))
    except NotProvable:
        pass
    if mask.equals(base.pred):
        return Select(base.pred, v, base.b)
    if mask.equals(base.pred.negate()):
        return Select(base.pred, base.a, v)
    raise NotProvable("masked_fill of a mask with a different predicate")


def _cast(ev, node: Node):
    """A dtype cast: values converted as torch converts them (truncation into integers)."""
    src = node.args[0]
    x = ev.value(src)
    dtype = dtype_of(node)
    if dtype == torch.bool:  # nonzero -> True, as torch casts
        return md.as_pred(x) if not isinstance(x, Lin) else _lin_to_bool(x)
    if isinstance(x, Lin):
        if dtype.is_floating_point:
            raise NotProvable("an integer position tensor cast to a float dtype")
        return x
    s = md.as_select(x)
    return Select(s.pred, scalars.convert(src, s.a, dtype), scalars.convert(src, s.b, dtype))


def _lin_to_bool(x: Lin):
    if x.is_constant:
        return Pred(x.rank, None, not same(x.const, 0))
    raise NotProvable("an integer position tensor cast to bool")


VALUE_RULES = {
    "arange": _arange, "iota": _arange,
    **{n: _fill for n in ("ones", "zeros", "full", "scalar_tensor", "tensor", "ones_like",
                          "zeros_like", "full_like", "new_ones", "new_zeros", "new_full")},
    "tril": _tri, "triu": _tri,
    **{n: _compare for n in _COMPARE},
    "add": _arith, "sub": _arith, "mul": _arith, "neg": _arith,
    **{n: _logical for n in ("logical_not", "bitwise_not", "logical_and", "logical_or",
                             "bitwise_and", "bitwise_or")},
    "where": _where, "masked_fill": _masked_fill,
    **{n: _cast for n in _CASTS},
}
