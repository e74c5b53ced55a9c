"""Prove that a mask tensor built in the graph is exactly the causal mask (or masks nothing).

:func:`evaluate` interprets the subgraph that produces a mask in the abstract domain of
:mod:`.domain`: it succeeds only when every op on the way is a creation op (``arange``,
``iota``, ``ones``, ``full``, ...) or an op on such values (comparisons, ``tril``/``triu``,
``where``, ``masked_fill``, broadcasting and view ops, dtype casts). A placeholder, parameter,
buffer, in-place mutation or unknown op anywhere makes it raise :class:`NotProvable`, so a mask
that depends on input data (key padding, a ``tril`` buffer that could be overwritten) is never
mistaken for a causal one. The result is exact over integers: no sampling, no shape guesses.

:func:`classify` reads the abstract value the way an attention call uses its mask:
``"keep"`` (bool, True = attend: SDPA, ``torch.where(m, s, -inf)``), ``"masked"`` (bool, True =
hide: ``masked_fill(m, -inf)``), or ``"additive"`` (float added to the scores, 0 or -inf / the
dtype's min). It returns ``"causal"`` (query i sees keys j <= i), ``"none"`` (sees every key), or
raises.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.fx import Node

from graph_passes.fx_nodes import meta_val, op_name
from graph_passes.mask import domain as md
from graph_passes.mask.domain import Lin, NotProvable, Pred, Select
from graph_passes.mask.index_rules import INDEX_RULES
from graph_passes.mask.value_rules import VALUE_RULES, shape_of

RULES = {**VALUE_RULES, **INDEX_RULES}

# Additive fill values that hide a key exactly: -inf, or the most negative finite value of a
# float dtype (Hugging Face's masks): s + min underflows exp() to 0.0 for any finite score s.
_HIDING = frozenset([-math.inf] + [torch.finfo(d).min for d in
                                   (torch.float16, torch.bfloat16, torch.float32, torch.float64)])
_NOOP_INPLACE = {"add_": 0, "sub_": 0, "mul_": 1}
_WRITES = frozenset({"setitem", "copy_", "index_put_", "fill_", "masked_fill_", "__setitem__"})
# Ops whose result may share memory with their first argument: a write to it writes the mask.
_ALIASES = frozenset({"getitem", "select", "slice", "view", "reshape", "_unsafe_view", "unsqueeze",
                      "squeeze", "expand", "expand_as", "transpose", "permute", "t", "alias",
                      "as_strided", "diagonal", "narrow", "unflatten", "flatten", "view_as",
                      "detach", "contiguous", "to", "type_as", "unbind", "split", "chunk"})


class _Evaluator:
    """Abstract values of nodes, memoised. With ``assume_tril``, a square bool graph input (a
    ``causal_mask`` buffer) is taken to be ``tril(ones)``; each one taken so is in ``assumed``,
    for the caller to check at run time."""

    def __init__(self, assume_tril: bool = False):
        self.memo: dict[Node, object] = {}
        self.assume_tril = assume_tril
        self.assumed: list[Node] = []
        self.written: dict[Node, list[Node]] = {}  # position inputs -> their in-place writers

    def scalar(self, x):
        """A Python/SymInt scalar argument (constant or a size node)."""
        if isinstance(x, Node):
            val = meta_val(x)
            if isinstance(val, (int, float, bool, torch.SymInt, torch.SymFloat)):
                return val
            return md.scalar_of(self.value(x))
        return x

    def value(self, x, rank: int | None = None):
        """Abstract value of ``x`` (a node or a Python scalar), lifted to ``rank`` dims."""
        if not isinstance(x, Node):
            if isinstance(x, bool):
                v = Pred(0, None, x)
            elif isinstance(x, (int, torch.SymInt)):
                v = Lin((), x)
            elif isinstance(x, float):
                v = Select(Pred(0, None, True), x, x)
            else:
                raise NotProvable(f"unsupported constant {x!r}")
        else:
            if x not in self.memo:
                self.memo[x] = self._eval(x)
            v = self.memo[x]
        return v if rank is None else md.lift(v, rank)

    def _eval(self, node: Node):
        if node.op in ("placeholder", "get_attr"):
            val = meta_val(node)
            if isinstance(val, torch.Tensor) and val.dim() <= 1 and not val.is_floating_point() \
                    and val.dtype != torch.bool:
                # input_pos / cache_position (1-D), a cache's length counter (0-d): values
                # unknown. Writes to it are allowed and reported: the caller must know that
                # the mask read it before them.
                writers = self._writers(node)
                if writers:
                    self.written[node] = writers
                return md.position_input(node, val.dim())
            if self.assume_tril and isinstance(val, torch.Tensor) and val.dtype == torch.bool \
                    and val.dim() == 2 and md.same(val.shape[0], val.shape[1]) \
                    and self._writer(node) is None:
                self.assumed.append(node)
                return Pred(2, Lin((1, -1), 0))  # keep column c <= row r
            raise NotProvable(f"it depends on the input or attribute {node.target!r}")
        name = op_name(node)
        if name is None:
            raise NotProvable(f"unknown op {node.target} at {node.name}")
        writer = self._writer(node)
        if writer is not None:
            raise NotProvable(f"{node.name} is modified in place by {writer.name}")
        rule = RULES.get(name)
        if rule is None:
            if name in _NOOP_INPLACE and self._noop_inplace(node, name):
                return self.value(node.args[0])
            raise NotProvable(f"op {name!r} at {node.name} is not a position-only mask op")
        out = rule(self, node)
        return md.zero_unit_dims(out, shape_of(node))

    def _writer(self, node: Node) -> Node | None:
        """An op that writes ``node``'s memory in place, directly or through a view, if any."""
        writers = self._writers(node, first_only=True)
        return writers[0] if writers else None

    def _writers(self, node: Node, first_only: bool = False) -> list[Node]:
        """The ops that write ``node``'s memory in place, directly or through a view."""
        found = []
        work, seen = [node], set()
        while work:
            x = work.pop()
            if x in seen:
                continue
            seen.add(x)
            for user in x.users:
                uname = op_name(user) or ""
                if not user.args or user.args[0] is not x:
                    continue
                if uname in _WRITES or (uname.endswith("_") and not uname.startswith("_")):
                    if not self._noop_inplace(user, uname):
                        found.append(user)
                        if first_only:
                            return found
                elif uname in _ALIASES:
                    work.append(user)
        return found

    def _noop_inplace(self, node: Node, name: str) -> bool:
        if name not in _NOOP_INPLACE or len(node.args) < 2:
            return False
        other = meta_val(node.args[1])
        return isinstance(other, (int, float)) and other == _NOOP_INPLACE[name]


def evaluate(node: Node):
    """Abstract value (``Lin`` / ``Pred`` / ``Select``) of tensor ``node``; raises NotProvable."""
    return _Evaluator().value(node)


def _keep(node: Node, usage: str, scores_rank: int, ev: _Evaluator | None = None) -> Pred:
    """Where the mask lets a query see a key, as a predicate over the scores' indices."""
    value = (ev or _Evaluator()).value(node)
    if value.rank > scores_rank:
        raise NotProvable(f"a rank-{value.rank} mask for rank-{scores_rank} scores")
    value = md.lift(value, scores_rank)
    if usage == "additive":
        s = md.as_select(value)
        if s.pred.lin is None:
            fill = s.a if s.pred.value else s.b
            if fill == 0:
                return Pred(scores_rank, None, True)
            raise NotProvable(f"a constant additive mask {fill}")
        if s.a == 0 and s.b in _HIDING:
            keep = s.pred
        elif s.b == 0 and s.a in _HIDING:
            keep = s.pred.negate()
        else:
            raise NotProvable(f"an additive mask with values {s.a} / {s.b}, not 0 / -inf or the "
                              f"dtype's min")
    else:
        keep = md.as_pred(value)
        if usage == "masked":
            keep = keep.negate()
    return keep


def classify(node: Node, usage: str, scores_rank: int = 4) -> str:
    """``"causal"`` or ``"none"`` for a mask used as ``usage``; raises :class:`NotProvable`.

    Args:
        node: the FX node producing the mask (broadcastable to ``[..., Sq, Sk]``).
        usage: ``"keep"`` (bool, True = attend), ``"masked"`` (bool, True = hidden) or
            ``"additive"`` (float added to the scores).
        scores_rank: rank of the scores the mask broadcasts against.
    """
    keep = _keep(node, usage, scores_rank)
    if keep.lin is None:
        if keep.value:
            return "none"
        raise NotProvable("a mask that hides every key")
    if keep.equals(md.causal_pred(scores_rank)):
        return "causal"
    if _band(keep, md.causal_pred(scores_rank).lin) is not None:
        raise NotProvable("a causal sliding window (see causal_window)")
    if any(h.terms for h in keep.half_planes):
        inputs = sorted({str(n.target) for n, _, _ in keep.lin.terms})
        raise NotProvable(f"it depends on the input {', '.join(inputs)} (a mask over positions "
                          f"read from it{_cache_hint(node, usage, scores_rank)})")
    raise NotProvable(f"a position mask that is not causal (keeps {keep.lin})")


def _band(keep: Pred, main: Lin) -> int | None:
    """``w`` when ``keep`` is exactly ``main >= 0 and w - main >= 0`` (a band of width w + 1
    along ``main``, ``w >= 0`` a constant), else None."""
    planes = keep.half_planes
    if len(planes) != 2:
        return None
    for a, b in (planes, planes[::-1]):
        total = a + b
        if a.equals(main) and total.is_constant and isinstance(total.const, int) \
                and total.const >= 0:
            return total.const
    return None


def causal_window(node: Node, usage: str, scores_rank: int = 4) -> int:
    """``window_left`` when the mask is exactly a causal sliding window, query i seeing keys
    ``i - window_left <= j <= i`` (``(j <= i) & (i - j < W)``: ``window_left = W - 1``);
    raises :class:`NotProvable` otherwise."""
    keep = _keep(node, usage, scores_rank)
    w = _band(keep, md.causal_pred(scores_rank).lin)
    if w is None:
        raise NotProvable("not a causal sliding window")
    return w


def _cache_hint(node, usage, scores_rank) -> str:
    try:
        pos = cache_positions(node, usage, scores_rank).pos
    except NotProvable as e:  # say why it is no attention over a cache either
        return f"; not 'key j iff j <= position' over a cache: {e}"
    return f": key j seen by query i iff j <= {pos.target}[i], attention over a cache"


class CacheMask(NamedTuple):
    """A mask proven to be "query i sees key j iff ``j <= position(i)``", where position(i) is
    (``kind``) ``"each"``: ``pos[i]`` (gpt-fast's ``input_pos``); ``"first"``: ``pos[0]`` for
    every query (a mask row of one query); ``"offset"``: ``pos + i`` for a 0-d or one-element
    ``pos`` (transformers' StaticCache: ``cumulative_length + arange``), consecutive by
    construction."""
    pos: Node  # the integer graph input (1-D, or 0-d for "offset")
    kind: str
    assumed: tuple  # square bool inputs taken to be tril(ones): to check at run time
    written: tuple  # in-place writes of pos in the graph (the mask read it before them?)
    window_left: int = -1  # also hides keys before position(i) - window_left (-1: none)


def cache_positions(node: Node, usage: str, scores_rank: int = 4,
                    assume_tril_buffers: bool = False) -> CacheMask:
    """The :class:`CacheMask` when the mask is exactly "query i sees key j iff ``j <= pos[i]``"
    for a 1-D integer input ``pos`` (gpt-fast's ``input_pos``, transformers' ``cache_position``);
    else raises.

    The positions are data, so this is a statement about every value they may take (taken as
    valid indices, ``pos >= 0``, where the mask indexes with them). With
    ``assume_tril_buffers``, a square bool input (gpt-fast's ``causal_mask`` buffer) is taken to
    be ``tril(ones)``; the result names those inputs in ``assumed``, and the statement holds
    only where they are: the caller must check it when the program runs.
    """
    ev = _Evaluator(assume_tril_buffers)
    keep = _keep(node, usage, scores_rank, ev)
    lin, window_left = keep.lin, -1
    if keep.more:  # a sliding window over the cache: the band along the main half-plane
        for main in keep.half_planes:
            w = _band(keep, main) if main.terms else None
            if w is not None:
                lin, window_left = main, w
                break
        else:
            inputs = sorted({str(n.target) for h in keep.half_planes for n, _, _ in h.terms})
            raise NotProvable("a band of positions that is not a window over one position"
                              + (f" (it reads {', '.join(inputs)})" if len(inputs) > 1 else ""))
    if lin is None or len(lin.terms) != 1:
        raise NotProvable("not a mask over one position input")
    (pos, onehot, c), = lin.terms
    query_dim = tuple(1 if d == scores_rank - 2 else 0 for d in range(scores_rank))
    key_only = tuple(-1 if d == scores_rank - 1 else 0 for d in range(scores_rank))
    offset = tuple(a + b for a, b in zip(key_only, query_dim))
    found = None
    if c == 1 and onehot == query_dim and lin.equals(Lin(key_only, 0, lin.terms)):
        found = "each"
    elif c == 1 and not any(onehot) and lin.equals(Lin(key_only, 0, lin.terms)):
        found = "first"
    elif c == 1 and not any(onehot) and lin.equals(Lin(offset, 0, lin.terms)):
        found = "offset"
    if found is not None:
        return CacheMask(pos, found, tuple(ev.assumed), tuple(ev.written.get(pos, ())),
                         window_left)
    raise NotProvable(f"a mask over positions of {pos.target} that is not j <= pos[i] "
                      f"(keeps {lin})")
