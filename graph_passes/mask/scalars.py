"""The constants of a mask, computed the way torch computes them: in the tensors' own dtypes.

A mask's abstract value (:mod:`.domain`) holds scalars: the two values of a ``Select``, the fill
of a constant. Python arithmetic on them would be float64 arithmetic, and models do not compute
in float64: ``tril * 0.1 + 0.2`` is ``0.3`` in fp32 (so ``> 0.3`` is False everywhere) but
``0.30000000000000004`` in Python, and ``(tril + 0.5).long()`` truncates 1.5 and 0.5 to 1 and 0.
So each constant is computed by the very torch op of the node, on one-element CPU tensors of
the operands' dtypes and ranks (a 0-d operand stays 0-d: type promotion treats it differently)
with Python-scalar operands passed as the literals they are. The values stay exactly
representable in their node's dtype from one rule to the next.

This runs at compile time on host scalars the graph already spells out; it reads no tensor
data of the model. The passes run inside the tracer's fake (and proxy) modes, so each
computation steps out of them: these are real one-element tensors, never graph values.
"""

from __future__ import annotations

import math

import torch
from torch.fx import Node
from torch.utils._python_dispatch import _disable_current_modes

from graph_passes.fx_nodes import meta_val
from graph_passes.mask.domain import NotProvable


def operand(arg, value):
    """What the op sees for argument ``arg`` when its (constant) element value is ``value``.

    A tensor node becomes a one-element tensor of its dtype and rank; anything else (a Python
    literal) is passed as it is, since torch gives literals their own promotion rules.
    """
    val = meta_val(arg) if isinstance(arg, Node) else None
    if isinstance(val, torch.Tensor):
        with _disable_current_modes():
            return torch.full([1] * val.dim(), value, dtype=val.dtype)
    if isinstance(arg, Node):
        raise NotProvable(f"{arg.name} is not a tensor with metadata")
    return arg


def apply(fn, *operands, **kwargs):
    """``fn(*operands).item()``: the value torch computes, as a Python scalar."""
    with _disable_current_modes():
        try:
            out = fn(*operands, **kwargs)
        except (RuntimeError, TypeError) as e:
            raise NotProvable(f"torch refuses the constant computation ({e})") from None
        return out.item() if isinstance(out, torch.Tensor) else out


def convert(arg, value, dtype: torch.dtype):
    """``value`` of argument ``arg`` converted to ``dtype`` as ``.to(dtype)`` would (truncating
    towards zero into an integer dtype); a non-finite value into an integer dtype is refused."""
    if not (dtype.is_floating_point or dtype == torch.bool) and isinstance(value, float) \
            and not math.isfinite(value):
        raise NotProvable(f"{value} cast to {dtype} (undefined)")
    x = operand(arg, value)
    if isinstance(x, torch.Tensor):
        return apply(x.to, dtype)
    return apply(torch.tensor, x, dtype=dtype)


def in_dtype(value, dtype: torch.dtype):
    """A literal as a tensor of ``dtype`` holds it (``torch.full(..., value, dtype=dtype)``)."""
    if isinstance(value, torch.SymInt):
        return value
    return apply(torch.full, (), value, dtype=dtype)
