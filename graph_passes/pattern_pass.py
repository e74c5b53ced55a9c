"""Hand-written attention -> ``attn.prefill`` with Inductor's pattern matcher (joint-graph pre-pass).

Installed as ``joint_custom_pre_pass``, it runs on the aten graph right after AOT autograd,
before Inductor's own ``fuse_attention`` patterns (which would turn the same code into SDPA).
The table of :mod:`attention_patterns` is traced with Inductor's ``fwd_only`` and registered
with ``register_replacement``: a loose match is re-traced at the real shapes and must match
exactly (dims, literals), then :func:`_extra_check` proves the mask causal and asks
:func:`eligibility.refuse_reason`.

Layout: ``matmul`` decomposes to ``expand -> [clone] -> view -> bmm``, with a clone only when
the operand is not viewable (a permuted q, an unexpanded permuted v, batch > 1). Rather than
tracing every combination, both the patterns and the graph are put in one canonical form
first: ``view(clone(x))`` and ``view(expand(x))`` become ``reshape``, and every reshape left
unmatched is turned back into exactly what it was.

Training graphs (with tangents) are left alone: the op has no backward.
"""

from __future__ import annotations

import functools

import torch
from torch._dynamo.utils import counters
from torch.fx import Graph, Node

from graph_passes import causal_mask
from graph_passes.attention_patterns import MASK_USAGE, SCALE_MAGIC, AttentionForm, forms
from graph_passes.eligibility import left_alone, refuse_reason
from graph_passes.ir import meta_val
from graph_passes.mask_domain import NotProvable, same
from graph_passes.pass_base import AttentionPass

aten = torch.ops.aten
PASS_NAME = "handwritten_to_prefill"
_CLONE_META = "graph_passes_clone_meta"  # on a canonical reshape: the clone it replaced, if any
_ORIGINAL_META = "graph_passes_view_meta"


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
                src_clone = graph.call_function(aten.clone.default, (src,),
                                                {"memory_format": torch.contiguous_format})
                src_clone.meta.update(node.meta[_CLONE_META])
                src = src_clone
            view = graph.call_function(aten.view.default, (src, node.args[1]))
        view.meta.update(node.meta[_ORIGINAL_META])
        node.replace_all_uses_with(view)
        graph.erase_node(node)


_SIZE_PREFIX = "tangents_size__"  # fx_to_pattern only accepts extra inputs named tangents*


def _trace(fn, args, argnames=(), **kwargs):
    """Inductor's ``fwd_only``, then the canonical form of the patterns (not for replacements).

    Besides the reshape canonicalization, each ``sym_size(x, d)`` of a pattern traced at
    symbolic shapes becomes an input named after ``x`` and ``d``: the graph reads the same
    size from a SymInt input rather than a ``sym_size`` node, and register_replacement passes
    only one symbol as an input. :func:`_sizes_agree` then checks each such input against
    the size it stands for, so nothing is loosened.
    """
    from torch._inductor.pattern_matcher import fwd_only
    gm = fwd_only(fn, args, **kwargs)
    if getattr(fn, "is_replacement", False):
        return gm
    graph = gm.graph
    canonicalize_reshapes(graph)
    placeholders = list(graph.find_nodes(op="placeholder"))
    n_sym = len(args) - len(argnames)  # leading SymInt inputs added by register_replacement
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
    gm.recompile()
    return gm


def _sizes_agree(kw: dict) -> bool:
    """Every size input of a specific match equals the size of the tensor it was read from."""
    for name, node in kw.items():
        if name.startswith(_SIZE_PREFIX):
            arg_name, dim = name[len(_SIZE_PREFIX):].rsplit("__", 1)
            tensor = meta_val(kw[arg_name])
            if not same(meta_val(node), tensor.shape[int(dim)]):
                return False
    return True


def _extra_check(form: AttentionForm, options):
    def check(match) -> bool:
        kw = match.kwargs
        where = f"hand-written attention ({form.name}) ending at {match.nodes[-1].name}"
        if not _sizes_agree(kw):
            return False
        scale = kw["scale"]
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
            left_alone(PASS_NAME, where, f"its scale {scale!r} is not a positive constant")
            return False
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


@functools.lru_cache(maxsize=32)
def pattern_pass_for(options, upcast: bool, scale_op: str, mask_op: str | None):
    """A PatternMatcherPass for one (softmax, scale, mask) form, with and without GQA folding.

    Tracing a form costs ~0.3 s on a 2-core CPU, so only the forms a graph can contain are
    built (see :func:`_candidate_forms`), once per process and options.
    """
    from torch._inductor.pattern_matcher import PatternMatcherPass, register_replacement
    patterns = PatternMatcherPass()
    for form in forms(options.fold_gqa, upcast, scale_op, mask_op):
        search, replace = form.functions()
        trace = functools.partial(_trace, argnames=form.argnames)
        register_replacement(search, replace, form.example_inputs(), trace, patterns,
                             extra_check=_extra_check(form, options),
                             scalar_workaround={"scale": SCALE_MAGIC})
    return patterns


_MASK_OPS_BY_TARGET = {aten.add.Tensor: ("add",), aten.where.self: ("masked_fill", "where")}
_SCALE_OPS_BY_TARGET = {aten.mul.Tensor: "mul", aten.div.Tensor: "div"}


def _candidate_forms(graph: Graph) -> set[tuple]:
    """(upcast, scale_op, mask_op) of every softmax whose input looks like scaled scores."""
    out = set()
    for amax in graph.find_nodes(op="call_function", target=aten.amax.default):
        x = amax.args[0]
        upcast = x.target is torch.ops.prims.convert_element_type.default
        if upcast:
            x = x.args[0]
        if x.target in _SCALE_OPS_BY_TARGET:
            out.add((upcast, _SCALE_OPS_BY_TARGET[x.target], None))
            continue
        for mask_op in _MASK_OPS_BY_TARGET.get(x.target, ()):
            for scores in x.all_input_nodes:
                if scores.target in _SCALE_OPS_BY_TARGET:
                    out.add((upcast, _SCALE_OPS_BY_TARGET[scores.target], mask_op))
    return out


def _is_training_graph(graph: Graph) -> bool:
    return any(n.op == "placeholder" and str(n.target).startswith("tangents")
               for n in graph.nodes)


def _log_unmatched_softmax(graph: Graph) -> None:
    """Debug-log softmaxes that still feed a batched matmul: attention we did not replace."""
    for node in graph.find_nodes(op="call_function", target=aten.amax.default):
        frontier, seen = list(node.users), set()
        for _ in range(8):
            nxt = []
            for n in frontier:
                if n.target is aten.bmm.default:
                    left_alone(PASS_NAME, f"the softmax at {node.name}",
                               "no attention form of the table matched it exactly (dropout, "
                               "another mask or scale form, or a check logged above)")
                    nxt = []
                    break
                if n not in seen:
                    seen.add(n)
                    nxt.extend(n.users)
            else:
                frontier = nxt
                continue
            break


class HandwrittenAttentionPass(AttentionPass):
    """Joint-graph pre-pass: ``torch.compile`` runs it on the aten graph before fuse_attention."""

    name = PASS_NAME

    def run(self, graph: Graph) -> int:
        if not self.options.handwritten:
            return 0
        if _is_training_graph(graph):
            left_alone(PASS_NAME, "this graph", "it is a training graph (the ops have no "
                                                "backward)")
            return 0
        from torch._inductor.fx_passes.post_grad import remove_noop_ops
        remove_noop_ops(graph)  # what fwd_only did to the patterns (Inductor runs it next anyway)
        candidates = _candidate_forms(graph)
        count = 0
        if candidates:
            canonicalize_reshapes(graph)
            try:
                for key in sorted(candidates, key=repr):
                    count += pattern_pass_for(self.options, *key).apply(graph)
            finally:
                restore_reshapes(graph)
        if count:
            graph.eliminate_dead_code()
        _log_unmatched_softmax(graph)
        return count
