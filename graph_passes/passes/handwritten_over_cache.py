"""Hand-written attention over a static KV cache -> ``attn.decode`` / paged ``attn.prefill``.

The hand-written forms of :mod:`.attention_forms` match attention over a cache as they match
any other: ``softmax(q @ k_cache^T * scale [softcapped] + mask) @ v_cache``, K/V the cache
buffers (as the functional aten graph writes them: ``index_put`` of the step's tokens), GQA by
``repeat_kv`` / ``repeat_interleave`` folded. What differs is the mask: it is built from the
positions (gpt-fast's ``input_pos``, transformers' ``cache_position``), so the prover that the
SDPA pass asks (:func:`graph_passes.passes.sdpa_over_cache.plan_cache_attention`, which calls
:func:`graph_passes.mask.causal_mask.cache_positions`) is asked here too, with the mask read the
way its form uses it (additive, ``masked_fill``, ``torch.where``).

The positions are not an argument of the pattern, so a cache form's replacement is a
placeholder op (:func:`.attention_forms.attention_over_cache`) keeping q, k, v, the mask and
the constants; :func:`emit_cache_sites` then plans each one again from its mask and emits the
same rewrite as the SDPA pass (:func:`graph_passes.rewrite.cache_attention.emit_cache_attention`:
the cache read as a view, key counts from the positions on the device, no recompile per
position), with the soft cap of Gemma2's form as the op's ``softcap``.
"""

from __future__ import annotations

import contextlib

import torch
from torch._dynamo.utils import counters
from torch.fx import Graph, Node

from graph_passes.fx_nodes import erase_dead, meta_val
from graph_passes.passes.attention_forms import MASK_USAGE, AttentionForm
from graph_passes.passes.sdpa_over_cache import emit_over_cache, plan_cache_attention
from graph_passes.rewrite.cache_attention import emit_cache_attention

CACHE_SITE = torch.ops.graph_passes.attention_over_cache.default
DECODE_COUNTER = "handwritten_to_decode"  # one query per sequence
PREFILL_COUNTER = "handwritten_over_cache_to_prefill"  # several queries


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def plan(q: Node, k: Node, v: Node, mask: Node, scale: float, softcap: float, mask_op: str,
         options) -> tuple[dict | None, str | None]:
    """``(plan, None)`` for attention over a cache, ``(None, reason)`` when it is one the ops
    cannot take, ``(None, None)`` when the mask is no position mask over a cache.

    ``scale`` multiplies q·k (already inverted for the ``/ inv_scale`` forms); ``softcap`` is
    0 for none.
    """
    if not options.tensor_masks:
        return None, None  # the dense forms say why
    if softcap != 0 and not _positive(softcap):
        return None, f"its softcap {softcap!r} is not a positive constant"
    # The matmuls already pair query head h with kv head h // n (repeat_kv folded by the form,
    # or equal head counts): enable_gqa says so to the planner.
    found = plan_cache_attention({"key": k, "value": v, "enable_gqa": True}, q, mask,
                                 MASK_USAGE[mask_op], scale, options, softcap)
    if found is None:
        if softcap:
            return None, ("its mask is not 'key j iff j <= position' over a cache (soft-capped "
                          "hand-written attention is substituted over a cache only)")
        return None, None
    return found


def check(kw: dict, form: AttentionForm, options) -> str | bool:
    """For a match of a cache form: True (substitute), False (not over a cache: the dense
    forms decide), or the reason it is left alone."""
    scale = kw["scale"] if form.scale_op == "mul" else 1.0 / kw["scale"]
    found, reason = plan(kw["query"], kw["key"], kw["value"], kw["attn_mask"], scale,
                         kw.get("softcap", 0.0), form.mask_op, options)
    if reason is not None:
        return reason
    return found is not None


_TENSOR_ARGS = ("q", "k", "v", "pos", "check_mask")


def _emit_decomposed(graph: Graph, anchor: Node, **plan) -> Node:
    """:func:`emit_cache_attention` for Inductor's aten graph, which comes after its
    decompositions (Inductor has no lowering for ``aten.arange``, ``clamp``, ``transpose``, ...):
    emitted into a scratch graph, traced again with those decompositions, spliced in before
    ``anchor``."""
    from torch._inductor.pattern_matcher import fwd_only
    names = [n for n in _TENSOR_ARGS if plan.get(n) is not None]
    scratch = Graph()
    holders = {}
    for name in names:
        holders[name] = scratch.placeholder(name)
        holders[name].meta.update(plan[name].meta)
    output = scratch.output(None)
    output.args = (emit_cache_attention(scratch, output, **{**plan, **holders}),)
    module = torch.fx.GraphModule(torch.nn.Module(), scratch)
    values = [meta_val(plan[n]) for n in names]
    with torch._guards.detect_fake_mode(values) or contextlib.nullcontext():
        traced = fwd_only(module, values)
    inputs = dict(zip(traced.graph.find_nodes(op="placeholder"), (plan[n] for n in names)))
    with graph.inserting_before(anchor):
        return graph.graph_copy(traced.graph, inputs)


def emit_cache_sites(graph: Graph, options, ir: str) -> int:
    """Replace each placeholder the cache forms left by the op; return how many. ``ir``:
    "inductor" (decomposed aten) or "export"."""
    count = 0
    for site in list(graph.find_nodes(op="call_function", target=CACHE_SITE)):
        q, k, v, mask, scale, softcap, mask_op = site.args
        found, reason = plan(q, k, v, mask, scale, softcap, mask_op, options)
        if found is None:  # checked when it matched: cannot happen
            raise AssertionError(f"graph_passes: {site.name} no longer plans ({reason})")
        out, counter = emit_over_cache(
            graph, site, found, (DECODE_COUNTER, PREFILL_COUNTER),
            _emit_decomposed if ir == "inductor" else emit_cache_attention)
        site.replace_all_uses_with(out)
        inputs = list(site.all_input_nodes)
        graph.erase_node(site)
        erase_dead(graph, inputs)
        counters["graph_passes"][counter] += 1
        count += 1
    return count
