"""Abstract values for masks built from positions: the algebra :mod:`.causal_mask` evaluates in.

A mask that depends on no input data is a function of the element index alone. The masks models
build (``arange`` comparisons, ``tril``/``triu`` of a constant, ``where``/``masked_fill`` between
constants) fall into three shapes of function, each exact over integers:

* :class:`Lin` -- an integer tensor ``const + sum_d coef[d] * idx[d]`` (``arange`` and sums of it),
  plus, for attention over a cache, terms ``c * pos[idx[d]]`` that read a 1-D integer input
  ``pos`` (``input_pos``, ``cache_position``) along one dim: the values are unknown, but a mask
  ``j <= pos[i]`` is still an exact statement about them;
* :class:`Pred` -- a bool tensor: a constant, or the half-plane ``lin >= 0`` (and further
  half-planes: a band, such as a sliding window ``j <= i and i - j < W``);
* :class:`Select` -- a float tensor ``a if pred else b`` with scalar ``a``, ``b`` (a constant is
  ``Select(TRUE, c, c)``).

Coefficients line up with the tensor's own dims (rank = ``len(coef)``); a dim of size 1 always
has coefficient 0, so broadcasting and ``expand`` never need to touch them. Coefficients and
constants are ints or SymInts; comparisons use :func:`same`, which never adds a guard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graph_passes.fx_nodes import same


class NotProvable(Exception):
    """The mask is not (provably) a function of positions alone, or not of a known form."""


def merge_terms(terms) -> tuple:
    """Sum the coefficients of equal ``(input, onehot)`` reads; drop the ones that cancel."""
    total: dict = {}
    for node, onehot, c in terms:
        total[(node, onehot)] = total.get((node, onehot), 0) + c
    return tuple((node, onehot, c) for (node, onehot), c in total.items() if c != 0)


@dataclass(frozen=True)
class Lin:
    """Integer tensor whose element at index ``idx`` is ``const + sum(coef[d] * idx[d])`` plus
    ``sum(c * input[idx[d]])`` over ``terms``.

    A term ``(input, onehot, c)`` reads the 1-D integer graph input ``input`` at the index of the
    dim where ``onehot`` has its 1 (all zeros: at index 0, for a dim of size 1). Keeping the dim
    as a one-hot coefficient tuple lets every view rule move it as it moves ``coef``.
    """
    coef: tuple
    const: object
    terms: tuple = ()

    @property
    def rank(self) -> int:
        return len(self.coef)

    @property
    def is_constant(self) -> bool:
        """The same value at every index (no index and no input read)."""
        return not self.terms and all(same(c, 0) for c in self.coef)

    def __add__(self, other: Lin) -> Lin:
        return Lin(tuple(a + b for a, b in zip(self.coef, other.coef)), self.const + other.const,
                   merge_terms(self.terms + other.terms))

    def scale(self, k) -> Lin:
        return Lin(tuple(a * k for a in self.coef), self.const * k,
                   merge_terms((n, o, c * k) for n, o, c in self.terms))

    def shift(self, c) -> Lin:
        return Lin(self.coef, self.const + c, self.terms)

    def map_terms(self, fn) -> tuple:
        """The terms with ``fn`` (coef tuple -> coef tuple) applied to their one-hot dims."""
        return merge_terms((n, tuple(fn(o)), c) for n, o, c in self.terms)

    def equals(self, other: Lin) -> bool:
        return (self.rank == other.rank and all(same(a, b) for a, b in zip(self.coef, other.coef))
                and same(self.const, other.const)
                and set(merge_terms(self.terms)) == set(merge_terms(other.terms)))


@dataclass(frozen=True)
class Pred:
    """Bool tensor: ``value`` (True/False) everywhere when ``lin`` is None, else ``lin >= 0``
    and ``m >= 0`` for every ``m`` in ``more`` (a conjunction of half-planes)."""
    rank: int
    lin: Lin | None = None
    value: bool = True
    more: tuple = ()

    @property
    def half_planes(self) -> tuple:
        return () if self.lin is None else (self.lin,) + self.more

    def map_lins(self, fn) -> Pred:
        """The same predicate with ``fn`` applied to each half-plane's Lin."""
        if self.lin is None:
            return self
        return Pred(self.rank, fn(self.lin), True, tuple(fn(m) for m in self.more))

    def negate(self) -> Pred:
        if self.lin is None:
            return Pred(self.rank, None, not self.value)
        if self.more:
            raise NotProvable("the negation of a band of positions (a union)")
        return Pred(self.rank, self.lin.scale(-1).shift(-1))  # not(L >= 0)  <=>  -L - 1 >= 0

    def equals(self, other: Pred) -> bool:
        if (self.lin is None) != (other.lin is None):
            return False
        if self.lin is None:
            return self.value == other.value
        mine, theirs = self.half_planes, other.half_planes
        return (all(any(a.equals(b) for b in theirs) for a in mine)
                and all(any(a.equals(b) for b in mine) for a in theirs))


@dataclass(frozen=True)
class Select:
    """Float tensor: ``a`` where ``pred`` holds, else ``b`` (scalars)."""
    pred: Pred
    a: float
    b: float

    @property
    def rank(self) -> int:
        return self.pred.rank


def constant(rank: int, value, dtype: torch.dtype):
    """The abstract value of a tensor filled with ``value``."""
    if dtype == torch.bool:
        return Pred(rank, None, bool(value))
    if dtype.is_floating_point:
        return Select(Pred(rank, None, True), float(value), float(value))
    return Lin((0,) * rank, value)


def map_dims(value, fn):
    """Apply ``fn`` (coef tuple -> coef tuple) to the index dims of any abstract value."""
    if isinstance(value, Lin):
        return Lin(tuple(fn(value.coef)), value.const, value.map_terms(fn))
    if isinstance(value, Pred):
        coef = fn((0,) * value.rank)
        if value.lin is None:
            return Pred(len(coef), None, value.value)
        return Pred(len(coef), map_dims(value.lin, fn), True,
                    tuple(map_dims(m, fn) for m in value.more))
    return Select(map_dims(value.pred, fn), value.a, value.b)


def lift(value, rank: int):
    """Broadcast ``value`` to ``rank`` dims (new leading dims have coefficient 0)."""
    if value.rank > rank:
        raise NotProvable(f"cannot broadcast rank {value.rank} to rank {rank}")
    return map_dims(value, lambda c: (0,) * (rank - len(c)) + tuple(c))


def zero_unit_dims(value, shape):
    """Zero the coefficients of size-1 dims (their index is always 0)."""
    return map_dims(value, lambda c: tuple(0 if same(s, 1) else k for k, s in zip(c, shape)))


def as_pred(value) -> Pred:
    """A bool view of ``value``: a Pred as is; ``Select(p, a, b)`` compared with zero."""
    if isinstance(value, Pred):
        return value
    if isinstance(value, Select):
        if value.a != 0 and value.b == 0:
            return value.pred
        if value.a == 0 and value.b != 0:
            return value.pred.negate()
        return Pred(value.rank, None, value.a != 0)
    raise NotProvable("an integer tensor used as a mask")


def as_select(value) -> Select:
    """A float view: bools become 1.0 / 0.0."""
    if isinstance(value, Select):
        return value
    if isinstance(value, Pred):
        return Select(value, 1.0, 0.0)
    raise NotProvable("an integer position tensor used as a float mask")


def compare(op: str, x, y) -> Pred:
    """``x <op> y`` for integer Lin operands (same rank); op in ge, gt, le, lt."""
    diff = x + y.scale(-1)  # x - y
    if op == "ge":
        return Pred(diff.rank, diff)
    if op == "gt":
        return Pred(diff.rank, diff.shift(-1))
    if op == "le":
        return Pred(diff.rank, diff.scale(-1))
    if op == "lt":
        return Pred(diff.rank, diff.scale(-1).shift(-1))
    raise NotProvable(f"comparison {op} of positions")


def combine_preds(op: str, p: Pred, q: Pred) -> Pred:
    """``p and q`` (a band: every half-plane of both) / ``p or q`` when one side is constant or
    both are the same."""
    is_and = op in ("logical_and", "bitwise_and", "mul")
    for x, y in ((p, q), (q, p)):
        if x.lin is None:
            if x.value == is_and:  # True and y / False or y
                return y
            return Pred(y.rank, None, x.value)
    if p.equals(q):
        return p
    if is_and:
        extra = tuple(m for m in q.half_planes if not any(m.equals(h) for h in p.half_planes))
        return Pred(p.rank, p.lin, True, p.more + extra)
    raise NotProvable(f"{op} of two different position predicates")


def scalar_of(value) -> float:
    """The single value of a constant-valued mask (raises for one that varies)."""
    s = as_select(value)
    if s.pred.lin is None:
        return s.a if s.pred.value else s.b
    if s.a == s.b:
        return s.a
    raise NotProvable("a position-dependent value where a constant was expected")


def position_input(node, rank: int = 1) -> Lin:
    """The value of an integer graph input read as positions: ``node[idx[0]]`` (rank 1) or the
    scalar ``node`` itself (rank 0)."""
    return Lin((0,) * rank, 0, ((node, (1,) * rank, 1),))


def causal_pred(rank: int) -> Pred:
    """``j <= i`` on the last two dims (query i, key j): top-left == bottom-right when Sq == Sk."""
    coef = [0] * rank
    coef[-2], coef[-1] = 1, -1
    return Pred(rank, Lin(tuple(coef), 0))
