"""The table of :mod:`.attention_forms` on Inductor's pattern matcher, for two IRs.

* ``"inductor"``: the aten graph of ``joint_custom_pre_pass`` (matmul decomposed into
  ``expand -> [clone] -> view -> bmm``, softmax into ``amax/sub/exp/sum/div``), traced with
  Inductor's ``fwd_only``;
* ``"export"``: ``torch.export``'s default IR (``aten.matmul``, ``aten.softmax.int``), traced with
  ``make_fx(pre_dispatch=True)``.

Each form is registered with ``register_replacement``: a loose match (literals ignored) is
re-traced at the real shapes and must then match exactly, and :func:`_extra_check` proves the
mask causal and asks :func:`graph_passes.rewrite.eligibility.refuse_reason`. Two adjustments
make that work on real graphs:

* Layout (inductor IR): a matmul operand gets a ``clone`` only when it is not viewable (a
  permuted q, batch > 1, ...). Instead of tracing every combination, patterns and graph are put
  in one canonical form: ``view(clone(x))`` and ``view(expand(x))`` become ``reshape``; every
  reshape left unmatched is turned back into exactly what it was.
* Symbolic sizes: the graph reads sizes from SymInt inputs, a pattern traced at symbolic shapes
  from ``sym_size`` nodes, and register_replacement lifts only one symbol to an input. Each
  ``sym_size(x, d)`` of a pattern becomes an input named after ``x`` and ``d``, and
  :func:`_sizes_agree` checks it equals that size, so the match stays exact.

Only the forms a graph can contain are traced (~0.3 s each on a 2-core CPU), once per process.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch._dynamo.utils import counters
from torch.fx import Graph, Node

from graph_passes.fx_nodes import erase_dead, meta_val, same
from graph_passes.mask import causal_mask
from graph_passes.mask.domain import NotProvable
from graph_passes.passes import handwritten_over_cache as over_cache
from graph_passes.passes.attention_forms import (MASK_USAGE, SCALE_MAGIC, SOFTCAP_MAGIC,
                                                 AttentionForm, forms)
from graph_passes.rewrite.eligibility import left_alone, refuse_reason

aten = torch.ops.aten
PASS_NAME = "handwritten_to_prefill"
_CLONE_META = "graph_passes_clone_meta"  # on a canonical reshape: the clone it replaced, if any
_ORIGINAL_META = "graph_passes_view_meta"
_SIZE_PREFIX = "tangents_size__"  # fx_to_pattern only accepts extra inputs named tangents*


# ---------------------------------------------------------------------------------------------
# Canonical form (inductor IR)
# ---------------------------------------------------------------------------------------------

def canonicalize_reshapes(graph: Graph) -> None:
    """``view(clone(x))`` / ``view(expand(x))`` -> ``reshape`` (undone by restore_reshapes)."""
    for node in list(graph.find_nodes(op="call_function", target=aten.view.default)):
        src = node.args[0]
        clone = None
        if isinstance(src, Node) and src.target is aten.clone.default and len(src.users) == 1 \
                and src.kwargs.get("memory_format", torch.contiguous_format) \
                is torch.contiguous_format:
            clone, src = src, src.args[0]
        elif not (isinstance(src, Node) and src.target is aten.expand.default):
            continue
        with graph.inserting_before(node):
            new = graph.call_function(aten.reshape.default, (src, node.args[1]))
        new.meta.update(node.meta)
        new.meta[_ORIGINAL_META] = dict(node.meta)
        new.meta[_CLONE_META] = dict(clone.meta) if clone is not None else None
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if clone is not None:
            graph.erase_node(clone)


def restore_reshapes(graph: Graph) -> None:
    """Turn every canonical reshape still in the graph back into its ``[clone ->] view``."""
    for node in list(graph.find_nodes(op="call_function", target=aten.reshape.default)):
        if _ORIGINAL_META not in node.meta:
            continue
        src = node.args[0]
        with graph.inserting_before(node):
            if node.meta[_CLONE_META] is not None:
                src = graph.call_function(aten.clone.default, (src,),
                                          {"memory_format": torch.contiguous_format})
                src.meta.update(node.meta[_CLONE_META])
            view = graph.call_function(aten.view.default, (src, node.args[1]))
        view.meta.update(node.meta[_ORIGINAL_META])
        node.replace_all_uses_with(view)
        graph.erase_node(node)


# ---------------------------------------------------------------------------------------------
# Tracing patterns
# ---------------------------------------------------------------------------------------------

def _lift_sizes(gm: torch.fx.GraphModule, n_args: int, argnames) -> None:
    """Each ``sym_size(input, d)`` -> a ``tangents_size__<input>__<d>`` input (see module doc)."""
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    n_sym = n_args - len(argnames)  # leading SymInt inputs added by register_replacement
    created: dict[str, Node] = {}
    for node in list(graph.find_nodes(op="call_function", target=aten.sym_size.int)):
        src, dim = node.args
        index = placeholders.index(src) - n_sym if src in placeholders else -1
        if not 0 <= index < len(argnames):
            continue
        name = f"{_SIZE_PREFIX}{argnames[index]}__{dim}"
        if name not in created:
            with graph.inserting_after(list(graph.find_nodes(op="placeholder"))[-1]):
                created[name] = graph.placeholder(name)
        node.replace_all_uses_with(created[name])
        graph.erase_node(node)


def _trace_inductor(fn, args, argnames=(), **kwargs):
    from torch._inductor.pattern_matcher import fwd_only
    gm = fwd_only(fn, args, **kwargs)
    if not getattr(fn, "is_replacement", False):
        canonicalize_reshapes(gm.graph)
        _lift_sizes(gm, len(args), argnames)
        gm.recompile()
    return gm


# export IR op -> positions of its dim arguments and how much rank they index beyond the input's
_DIM_ARGS = {aten.transpose.int: ((1, 0), (2, 0)), aten.softmax.int: ((1, 0),),
             aten.unsqueeze.default: ((1, 1),)}


def normalize_dims(graph: Graph) -> None:
    """Write negative dims of transpose / softmax / unsqueeze as non-negative (export IR).

    ``k.transpose(-2, -1)`` and ``k.transpose(2, 3)`` are one op on a 4-D tensor; the exact
    re-match would tell them apart.
    """
    for target, positions in _DIM_ARGS.items():
        for node in graph.find_nodes(op="call_function", target=target):
            val = meta_val(node.args[0])
            if not isinstance(val, torch.Tensor):
                continue
            args = list(node.args)
            for pos, extra in positions:
                if pos < len(args) and isinstance(args[pos], int) and args[pos] < 0:
                    args[pos] += val.dim() + extra
            node.args = tuple(args)


def _trace_export(fn, args, argnames=(), **kwargs):
    from torch.fx.experimental.proxy_tensor import make_fx
    gm = make_fx(fn, pre_dispatch=True)(*args)
    if not getattr(fn, "is_replacement", False):
        normalize_dims(gm.graph)
        _lift_sizes(gm, len(args), argnames)
        gm.recompile()
    return gm


_TRACERS = {"inductor": _trace_inductor, "export": _trace_export}


def _sizes_agree(kw: dict) -> bool:
    """Every size input of a specific match equals the size of the tensor it was read from."""
    for name, node in kw.items():
        if name.startswith(_SIZE_PREFIX):
            arg_name, dim = name[len(_SIZE_PREFIX):].rsplit("__", 1)
            if not same(meta_val(node), meta_val(kw[arg_name]).shape[int(dim)]):
                return False
    return True


def _extra_check(form: AttentionForm, options):
    def check(match) -> bool:
        kw = match.kwargs
        if not _sizes_agree(kw):
            return False
        where = f"hand-written attention ({form.name}) ending at {match.nodes[-1].name}"
        if "scale" not in kw:
            # Seen on torch 2.11 + CUDA: a match whose scalar workaround bound no scale; the
            # replacement needs it, so leave the call alone rather than guess.
            left_alone(PASS_NAME, where, "the matcher bound no scale constant for it")
            return False
        scale = kw["scale"]
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
            left_alone(PASS_NAME, where, f"its scale {scale!r} is not a positive constant")
            return False
        if form.cache:  # over a cache (handwritten_over_cache.py), or for the dense forms
            verdict = over_cache.check(kw, form, options)
            if isinstance(verdict, str):
                left_alone(PASS_NAME, where, verdict)
                return False
            return verdict
        if form.mask_op is not None:
            if not options.tensor_masks:
                left_alone(PASS_NAME, where, "it has a mask tensor and tensor_masks is off")
                return False
            try:
                kind = causal_mask.classify(kw["attn_mask"], MASK_USAGE[form.mask_op])
            except NotProvable as e:
                left_alone(PASS_NAME, where, f"its mask is not provably causal: {e}")
                return False
            if kind != "causal":
                left_alone(PASS_NAME, where, "its mask hides nothing (kept as written)")
                return False
        q, k, v = (meta_val(kw[n]) for n in ("query", "key", "value"))
        reason = refuse_reason(q, k, v, form.causal, options)
        if reason is not None:
            left_alone(PASS_NAME, where, reason)
            return False
        counters["graph_passes"][PASS_NAME] += 1
        return True
    return check


@functools.lru_cache(maxsize=64)
def pattern_pass_for(options, ir: str, softmax: str, scale_op: str, mask_op: str | None,
                     softcap: bool = False, cache: bool = False):
    """A PatternMatcherPass for one (softmax, scale, mask, softcap) form, with and without GQA
    folding, over a cache or dense (a pass of its own: the search patterns are the same)."""
    from torch._inductor.pattern_matcher import PatternMatcherPass, register_replacement
    patterns = PatternMatcherPass()
    for form in forms(options.fold_gqa, softmax, scale_op, mask_op, softcap, cache):
        search, replace = form.functions()
        trace = functools.partial(_TRACERS[ir], argnames=form.argnames)
        register_replacement(search, replace, form.example_inputs(), trace, patterns,
                             extra_check=_extra_check(form, options),
                             scalar_workaround={"scale": SCALE_MAGIC, "softcap": SOFTCAP_MAGIC})
    return patterns


# ---------------------------------------------------------------------------------------------
# Which forms a graph can contain
# ---------------------------------------------------------------------------------------------

_SCALES = {aten.mul.Tensor: "mul", aten.div.Tensor: "div"}
_MASKS = {aten.add.Tensor: ("add",), aten.where.self: ("masked_fill", "where"),
          aten.where.ScalarOther: ("where",), aten.masked_fill.Scalar: ("masked_fill",)}


def _softmax_inputs(graph: Graph, ir: str):
    """(softmax kind, input) of every softmax: ``amax`` in Inductor's IR, ``softmax.int`` in
    export's."""
    if ir == "inductor":
        for amax in graph.find_nodes(op="call_function", target=aten.amax.default):
            x = amax.args[0]
            if x.target is torch.ops.prims.convert_element_type.default:
                yield "fp32", x.args[0]
            else:
                yield "plain", x
    else:
        for sm in graph.find_nodes(op="call_function", target=aten.softmax.int):
            x = sm.args[0]
            if (len(sm.args) > 2 and sm.args[2] is not None) or sm.kwargs.get("dtype"):
                yield "fp32", x
            elif x.target is aten.to.dtype:
                yield "cast", x.args[0]
            else:
                yield "plain", x


def _scores_form(x: Node) -> tuple[str, bool] | None:
    """(scale_op, softcapped) when ``x`` looks like scaled scores, soft-capped or not
    (``tanh(s * scale / c) * c``)."""
    if x.target not in _SCALES:
        return None
    inner = x.args[0]
    if x.target is aten.mul.Tensor and isinstance(inner, Node) \
            and inner.target is aten.tanh.default and isinstance(inner.args[0], Node) \
            and inner.args[0].target is aten.div.Tensor \
            and isinstance(inner.args[0].args[0], Node) \
            and inner.args[0].args[0].target in _SCALES:
        return _SCALES[inner.args[0].args[0].target], True
    return _SCALES[x.target], False


def candidate_forms(graph: Graph, ir: str) -> set[tuple]:
    """(softmax, scale_op, mask_op, softcap) of every softmax whose input looks like scaled
    scores."""
    out = set()
    for softmax, x in _softmax_inputs(graph, ir):
        if not isinstance(x, Node):
            continue
        if x.target in _SCALES:
            out.add((softmax, _SCALES[x.target], None, False))
            continue
        for mask_op in _MASKS.get(x.target, ()):
            for scores in x.all_input_nodes:
                found = _scores_form(scores)
                if found is not None:
                    out.add((softmax, found[0], mask_op, found[1]))
    return out


def apply_attention_patterns(graph: Graph, options, ir: str) -> int:
    """Replace every hand-written attention of the table in ``graph``; return the count."""
    candidates = candidate_forms(graph, ir)
    if not candidates:
        return 0
    count = 0
    if ir == "inductor":
        canonicalize_reshapes(graph)
    else:
        normalize_dims(graph)
    try:
        for key, cache in itertools.product(sorted(candidates, key=repr), (True, False)):
            # Over a cache first: those forms take only masks over cache positions, the dense
            # ones then log why they leave the rest alone.
            count += pattern_pass_for(options, ir, *key, cache=cache).apply(graph)
    finally:
        if ir == "inductor":
            restore_reshapes(graph)
    over_cache.emit_cache_sites(graph, options, ir)  # the placeholders of the cache forms
    if count:
        erase_dead(graph, reversed(list(graph.nodes)))  # the masks the replacements orphaned
    return count
