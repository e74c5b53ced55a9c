"""One vocabulary for three FX dialects: Dynamo's torch-level graph, export's, Inductor's.

The passes read the same computation in three spellings: ``torch.tril`` / ``x.tril()`` in the
graph Dynamo hands to a backend, ``aten.tril.default`` in a ``torch.export`` program, and its
decomposition (``prims.iota``, ``aten.le``, ...) in Inductor's joint graph. :func:`op_name` maps
every target the passes understand to one lower-case name; :func:`arg` reads an argument by
position or keyword; :func:`meta_val` returns the fake value a tracer recorded for a node.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

# torch-level callables (Dynamo graphs) -> canonical name. Aten overloads use their packet name.
_FUNCTIONS = {
    torch.arange: "arange", torch.ones: "ones", torch.zeros: "zeros", torch.full: "full",
    torch.empty: "empty", torch.tensor: "tensor", torch.scalar_tensor: "scalar_tensor",
    torch.tril: "tril", torch.triu: "triu", torch.where: "where", torch.masked_fill: "masked_fill",
    torch.logical_not: "logical_not", torch.logical_and: "logical_and",
    torch.logical_or: "logical_or", torch.bitwise_not: "bitwise_not",
    torch.bitwise_and: "bitwise_and", torch.bitwise_or: "bitwise_or",
    torch.ge: "ge", torch.gt: "gt", torch.le: "le", torch.lt: "lt", torch.eq: "eq", torch.ne: "ne",
    torch.add: "add", torch.sub: "sub", torch.mul: "mul", torch.neg: "neg",
    torch.unsqueeze: "unsqueeze", torch.reshape: "reshape", torch.squeeze: "squeeze",
    torch.repeat_interleave: "repeat_interleave", torch.transpose: "transpose",
    torch.matmul: "matmul", torch.softmax: "softmax", F.softmax: "softmax", torch.diff: "diff",
    torch.cumsum: "cumsum", torch.cat: "cat",
    torch._C._nn.scaled_dot_product_attention: "scaled_dot_product_attention",
    operator.ge: "ge", operator.gt: "gt", operator.le: "le", operator.lt: "lt", operator.eq: "eq",
    operator.ne: "ne", operator.add: "add", operator.sub: "sub", operator.mul: "mul",
    operator.neg: "neg", operator.invert: "bitwise_not", operator.and_: "bitwise_and",
    operator.or_: "bitwise_or", operator.getitem: "getitem", operator.iadd: "add_",
    operator.isub: "sub_", operator.imul: "mul_", operator.setitem: "setitem",
}
# Tensor methods whose canonical name differs from the method name.
_METHODS = {"__invert__": "bitwise_not", "__and__": "bitwise_and", "__or__": "bitwise_or",
            "__getitem__": "getitem", "__iand__": "bitwise_and_", "__ior__": "bitwise_or_"}
# Canonical names of ops that return their input unchanged in value (layout or no-op copies).
IDENTITY_OPS = frozenset({"clone", "contiguous", "alias", "lift_fresh_copy", "detach",
                          "_assert_tensor_metadata"})


def op_name(node: Node) -> str | None:
    """Canonical lower-case op name of ``node`` in any of the three dialects, or None."""
    if node.op == "call_method":
        return _METHODS.get(node.target, node.target)
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return _METHODS.get(target.overloadpacket.__name__, target.overloadpacket.__name__)
    if isinstance(target, torch._ops.OpOverloadPacket):
        return _METHODS.get(target.__name__, target.__name__)
    try:
        return _FUNCTIONS.get(target)
    except TypeError:  # an unhashable callable
        return None


def same(a, b) -> bool:
    """``a == b`` for ints, floats or SymInts, True only when statically known (no guard)."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return bool(statically_known_true(a == b))
    return a == b


def arg(node: Node, index: int, name: str, default=None):
    """Argument ``name`` of ``node``: keyword first, then position ``index`` (methods: 0 = self)."""
    if name in node.kwargs:
        return node.kwargs[name]
    if index < len(node.args):
        return node.args[index]
    return default


def meta_val(node):
    """The fake tensor / SymInt a tracer recorded for ``node`` (None for constants or unknown)."""
    if not isinstance(node, Node):
        return node
    val = node.meta.get("val")
    if val is None:
        val = node.meta.get("example_value")
    return val


def size_arg(node: Node, first: int) -> list | None:
    """Sizes as varargs (``x.view(2, 3)``) or one list (``x.view([2, 3])``), from ``first``."""
    rest = node.args[first:]
    if "size" in node.kwargs:
        rest = (node.kwargs["size"],)
    if len(rest) == 1 and isinstance(rest[0], (list, tuple, torch.Size)):
        rest = tuple(rest[0])
    return [meta_val(s) for s in rest]


def _writes_nothing(node: Node) -> bool:
    """True for a call this module can name that mutates nothing and returns a value."""
    if node.op not in ("call_function", "call_method"):
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        schema = node.target._schema
        return not schema.is_mutable and len(schema.returns) > 0
    name = op_name(node)
    return name is not None and not (name.endswith("_") and not name.startswith("_"))


def erase_dead(graph, nodes) -> None:
    """Erase ``nodes`` and their inputs, transitively, once they have no users.

    Only calls that write nothing go (see :func:`_writes_nothing`): a pass cleans up what its
    rewrite orphaned without touching asserts or other side effects.
    """
    work = list(nodes)
    while work:
        node = work.pop()
        if getattr(node, "_erased", False) or node.users or not _writes_nothing(node):
            continue
        work.extend(node.all_input_nodes)
        graph.erase_node(node)
