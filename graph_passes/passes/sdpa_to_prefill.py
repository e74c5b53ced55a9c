"""SDPA -> ``attn.prefill``: a pre-grad pass (and the SDPA half of the export pass).

Matches ``F.scaled_dot_product_attention`` (``torch._C._nn.scaled_dot_product_attention`` in a
Dynamo graph) and ``aten.scaled_dot_product_attention.default`` (export graphs). A call is
substituted when all of these hold, else it is left alone with a debug log saying why:

* ``dropout_p`` is the constant 0 and ``scale`` a constant (or None: ``D ** -0.5``);
* the mask is None, or a tensor built in the graph from positions alone that
  :mod:`graph_passes.mask.causal_mask` proves equal to the causal mask (or to no mask at all);
* causal only with Sq == Sk provable (SDPA's ``is_causal`` is top-left aligned, attn.prefill
  bottom-right; they agree only on square score matrices);
* q/k/v pass :func:`graph_passes.rewrite.eligibility.refuse_reason` (4-D, fp32/fp16/bf16, head
  dim, no gradients, and the chosen attn backend's ``supports()``).

GQA: ``enable_gqa=True`` with Hkv heads passes K/V as they are; K/V expanded by ``repeat_kv`` or
``repeat_interleave`` before the call are folded back to their Hkv heads.

Over a static KV cache (gpt-fast, transformers' StaticCache): SDPA whose mask
:func:`graph_passes.mask.causal_mask.cache_positions` proves to be "key j iff j <= pos[i]" for
a position input ``pos`` reads only keys ``0..pos`` of the cache, in either memory order (a
view, see :mod:`graph_passes.rewrite.cache_attention`): ``attn.decode`` for
one query per sequence (counted as ``sdpa_to_decode``), a paged ``attn.prefill`` for several
at consecutive positions (``sdpa_over_cache_to_prefill``).
"""

from __future__ import annotations

import math

import torch
from torch._dynamo.utils import counters
from torch.fx import Graph, Node

from graph_passes.fx_nodes import erase_dead, meta_val, op_name
from graph_passes.mask import causal_mask
from graph_passes.mask.domain import NotProvable
from graph_passes.passes.base import AttentionPass
from graph_passes.passes.sdpa_over_cache import emit_over_cache, plan_cache_attention
from graph_passes.rewrite import gqa_folding
from graph_passes.rewrite.dense_prefill import emit_dense_prefill
from graph_passes.rewrite.eligibility import left_alone, refuse_reason

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
              "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}
PASS_NAME = "sdpa_to_prefill"


def _sdpa_args(node: Node) -> dict:
    args = dict(_SDPA_DEFAULTS)
    args.update(zip(_SDPA_ARGS, node.args))
    args.update(node.kwargs)
    return args


def _plan(node: Node, options) -> tuple[dict | None, str | None]:
    """The substitution for SDPA ``node`` (q, k, v nodes, scale, causal), or the refusal reason."""
    a = _sdpa_args(node)
    if isinstance(a["dropout_p"], Node) or a["dropout_p"] != 0:
        return None, f"dropout_p={a['dropout_p']} is not the constant 0"
    if not isinstance(a["is_causal"], bool):
        return None, "is_causal is not a constant bool"
    q, k, v = a["query"], a["key"], a["value"]
    qv = meta_val(q)
    if qv is None or qv.dim() != 4:
        return None, "the query is not a 4-D [B, H, S, D] tensor"
    scale = a["scale"]
    if scale is None:
        d = qv.shape[-1]
        if not isinstance(d, int):
            return None, "the head dim is symbolic, so the default scale is not a constant"
        scale = 1.0 / math.sqrt(d)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
        return None, f"scale={scale!r} is not a positive constant"
    causal = a["is_causal"]
    window_left = -1
    mask = a["attn_mask"]
    if mask is not None:
        if causal:
            return None, "it has both attn_mask and is_causal=True"
        if not options.tensor_masks:
            return None, "it has a mask tensor and tensor_masks is off"
        mask_val = meta_val(mask)
        if mask_val is None:
            return None, "its attn_mask carries no tensor metadata"
        # SDPA reads a bool mask as "True = attend" and a float mask as added to the scores.
        usage = "keep" if mask_val.dtype == torch.bool else "additive"
        try:
            causal = causal_mask.classify(mask, usage, scores_rank=4) == "causal"
        except NotProvable as e:
            over_cache = plan_cache_attention(a, q, mask, usage, scale, options)
            if over_cache is not None:
                return over_cache
            try:
                window_left, causal = causal_mask.causal_window(mask, usage, 4), True
            except NotProvable:
                return None, f"its attn_mask is not provably causal: {e}"
    if options.fold_gqa:
        k, v, _ = gqa_folding.unexpand_pair(k, v)
    reason = refuse_reason(qv, meta_val(k), meta_val(v), causal, options, window_left)
    if reason is not None:
        return None, reason
    if not a["enable_gqa"] and k is a["key"] and meta_val(k).shape[1] != qv.shape[1]:
        return None, "Hq != Hkv without enable_gqa (SDPA itself would reject it)"
    plan = dict(q=q, k=k, v=v, scale=float(scale), causal=causal)
    if window_left >= 0:
        plan["window_left"] = window_left
    return plan, None


def substitute_sdpa(graph: Graph, options) -> int:
    """Replace every eligible SDPA call in ``graph``; return how many were replaced."""
    count = 0
    for node in list(graph.nodes):
        if op_name(node) != "scaled_dot_product_attention":
            continue
        plan, reason = _plan(node, options)
        if plan is None:
            left_alone(PASS_NAME, f"SDPA call {node.name}", reason)
            continue
        if "pos" in plan:
            out, counter = emit_over_cache(graph, node, plan)
        else:
            out, counter = emit_dense_prefill(graph, node, **plan), PASS_NAME
        node.replace_all_uses_with(out)
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        erase_dead(graph, inputs)
        counters["graph_passes"][counter] += 1
        count += 1
    return count


class SdpaToPrefillPass(AttentionPass):
    """Pre-grad pass: ``torch.compile`` runs it on the Dynamo graph before AOT autograd."""

    name = PASS_NAME

    def run(self, graph: Graph) -> int:
        if not self.options.sdpa:
            return 0
        return substitute_sdpa(graph, self.options)
