"""The attention substitution for ``torch.export``: ExportedProgram / GraphModule in, same out.

``substitute_attention(ep)`` applies what ``torch.compile(backend="attn_ops")`` applies, to an
exported program in export's default IR (the output of ``torch.export.export``): every eligible
``aten.scaled_dot_product_attention`` call, and every hand-written attention of the table, each
becomes ``attn.prefill`` on THD views with in-graph ``cu_seqlens``. Ineligible calls are left as
they are (debug log ``graph_passes``), exactly as under ``torch.compile``. The input is not
modified; the result shares its weights. It can be run, saved (``torch.export.save``) and
lowered further (``run_decompositions``) like any exported program.

Programs already decomposed to core ATen (``ep.run_decompositions()``) keep their SDPA as
backend-specific ops and their hand-written attention as ``bmm``/``_softmax``: substitute before
decomposing.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch.fx import GraphModule

from graph_passes.options import SubstitutionOptions
from graph_passes.passes.pattern_matching import apply_attention_patterns
from graph_passes.passes.sdpa_to_prefill import substitute_sdpa

_ASSERT = torch.ops.aten._assert_tensor_metadata.default


def _detach_asserts(graph) -> list:
    """Remove export's dtype asserts (they would block matching); return what to put back."""
    saved = []
    for node in list(graph.find_nodes(op="call_function", target=_ASSERT)):
        saved.append((node.args, node.kwargs, dict(node.meta)))
        graph.erase_node(node)
    return saved


def _restore_asserts(graph, saved) -> None:
    """Re-insert each assert whose checked tensor still exists, right after it."""
    for args, kwargs, meta in saved:
        checked = args[0]
        if getattr(checked, "_erased", False):
            continue
        with graph.inserting_after(checked):
            node = graph.call_function(_ASSERT, args, kwargs)
        node.meta.update(meta)


def _drop_noop_dropout(graph) -> None:
    """``aten.dropout(x, p, train)`` with ``train=False`` or ``p=0`` is ``x`` (export keeps it)."""
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.aten.dropout.default)):
        x, p, train = node.args
        if train is False or p == 0:
            node.replace_all_uses_with(x)
            graph.erase_node(node)


def substitute_graph(gm: GraphModule, options: SubstitutionOptions) -> int:
    """Substitute in ``gm`` (export IR, nodes with ``meta['val']``) in place; return the count."""
    graph = gm.graph
    count = 0
    if options.sdpa:
        count += substitute_sdpa(graph, options)
    if options.handwritten:
        _drop_noop_dropout(graph)
        saved = _detach_asserts(graph)
        try:
            count += apply_attention_patterns(graph, options, "export")
        finally:
            _restore_asserts(graph, saved)
    graph.lint()
    gm.recompile()
    return count


def _copy_module(gm: GraphModule) -> GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (parameters and buffers shared)."""
    new = GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta.update(gm.meta)
    return new


def substitute_attention(ep_or_gm, *, options: SubstitutionOptions | dict | None = None):
    """Replace eligible attention in an exported program with ``torch.ops.attn.prefill``.

    Args:
        ep_or_gm: a ``torch.export.ExportedProgram`` (default IR), or an FX GraphModule in
            aten IR whose nodes carry ``meta['val']`` (e.g. ``ep.graph_module``, or
            ``make_fx(f, pre_dispatch=True)``).
        options: :class:`SubstitutionOptions`, or a dict of its fields.

    Returns:
        A new ExportedProgram / GraphModule (the input is left unchanged). The number of
        substitutions is added to ``torch._dynamo.utils.counters["graph_passes"]``.

    Example:
        >>> ep = torch.export.export(model.eval(), (x,))
        >>> ep2 = substitute_attention(ep)
        >>> ep2.module()(x)   # runs attn.prefill
    """
    options = SubstitutionOptions.coerce(options)
    if options.only_if_faster is None:  # the program runs elsewhere: the contract decides
        options = dataclasses.replace(options, only_if_faster=False)
    if isinstance(ep_or_gm, torch.export.ExportedProgram):
        ep = ep_or_gm
        gm = _copy_module(ep.graph_module)
        old_outputs = [str(a) for a in _output_args(gm)]
        substitute_graph(gm, options)
        signature = copy.deepcopy(ep.graph_signature)
        renamed = dict(zip(old_outputs, (str(a) for a in _output_args(gm))))
        for spec in signature.output_specs:
            name = getattr(spec.arg, "name", None)
            if name in renamed:
                spec.arg.name = renamed[name]
        return ep._update(gm, signature)
    if isinstance(ep_or_gm, GraphModule):
        gm = _copy_module(ep_or_gm)
        substitute_graph(gm, options)
        return gm
    raise ValueError(f"ep_or_gm: expected a torch.export.ExportedProgram or a "
                     f"torch.fx.GraphModule, got {type(ep_or_gm).__name__}")


def _output_args(gm: GraphModule) -> list:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    args = out.args[0]
    return list(args) if isinstance(args, (list, tuple)) else [args]


__all__ = ["substitute_attention", "substitute_graph"]
