"""The SDPA pass's plan for attention over a static KV cache (its emission is in
:mod:`graph_passes.rewrite.cache_attention`).

When an SDPA call's mask is not the plain causal mask, :func:`plan_cache_attention` asks the
mask prover whether it is "key j iff j <= position(i)" over a position input, and checks what
the ops need: one query per sequence (``attn.decode``) or several at consecutive positions
(paged ``attn.prefill``), a head dim with stride 1 (the cache goes over as a view), the contract
and the backend (which may refuse a strided, heads-major cache).
A position input the graph writes in place (transformers' ``cumulative_length.add_``) is
accepted when every write comes after the mask has read it; the op then reads a copy taken at
the top of the graph, before any write (a few ints).
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from attn_ops.contract import OpConfig

from graph_passes.fx_nodes import meta_val, same
from graph_passes.mask import causal_mask
from graph_passes.mask.domain import NotProvable
from graph_passes.rewrite import gqa_folding
from graph_passes.rewrite.cache_attention import emit_cache_attention
from graph_passes.rewrite.eligibility import backend_reason, refuse_cache_reason

DECODE_COUNTER = "sdpa_to_decode"  # one query per sequence
PREFILL_COUNTER = "sdpa_over_cache_to_prefill"  # several queries
_SNAPSHOT_META = "graph_passes_positions_snapshot"


def plan_cache_attention(a: dict, q: Node, mask: Node, usage: str, scale: float, options,
                         softcap: float = 0.0):
    """``(plan, None)``, ``(None, reason)``, or None when the mask is not a position mask.

    ``a`` holds the SDPA call's arguments by name (``key``, ``value``, ``enable_gqa``; the
    hand-written pass gives its matched K/V with ``enable_gqa=True``); ``q`` its query node;
    ``softcap`` > 0 the scores' cap (hand-written Gemma2 forms).
    """
    try:
        found = causal_mask.cache_positions(mask, usage, scores_rank=4)
    except NotProvable:
        if not (options.checked_masks and usage == "keep"):
            return None
        try:  # gpt-fast's causal_mask buffer: taken as tril, checked on the device
            found = causal_mask.cache_positions(mask, usage, 4, assume_tril_buffers=True)
        except NotProvable:
            return None
    k, v = a["key"], a["value"]
    if options.fold_gqa:
        k, v, _ = gqa_folding.unexpand_pair(k, v)
    reason = refuse_cache_reason(meta_val(q), meta_val(k), meta_val(v), options,
                                 found.window_left)
    if reason is None and softcap > 0:
        reason = _softcap_reason(meta_val(q), meta_val(k), meta_val(v), options,
                                 found.window_left, softcap)
    sq = meta_val(q).shape[2]
    if reason is None and not isinstance(sq, int):
        reason = "a symbolic number of queries over a cache"
    if reason is None and found.kind == "first" and sq != 1:
        reason = "every query sees the keys up to the first position (not causal)"
    if reason is None and found.written and not _all_after(found.written, mask):
        reason = f"{found.pos.target} is written in place before the mask reads it"
    if reason is not None:
        return None, f"{reason} (a mask over the positions in {found.pos.target}: attention " \
                     f"over a cache)"
    if not a["enable_gqa"] and k is a["key"] and meta_val(k).shape[1] != meta_val(q).shape[1]:
        return None, "Hq != Hkv without enable_gqa (SDPA itself would reject it)"
    plan = dict(q=q, k=k, v=v, scale=float(scale), pos=found.pos, kind=found.kind,
                check_mask=mask if found.assumed else None, window_left=found.window_left,
                snapshot=bool(found.written))
    if softcap > 0:
        plan["softcap"] = float(softcap)
    return plan, None


def _softcap_reason(q, k, v, options, window_left: int, softcap: float) -> str | None:
    """Would the backend run the op with ``softcap``? (``refuse_cache_reason`` asks it without
    one; flash's older providers have no softcap.)"""
    contiguous = all(bool(statically_known_true(t.transpose(1, 2).is_contiguous()))
                     for t in (k, v))
    config = OpConfig("decode" if same(q.shape[2], 1) else "prefill", q.device, q.dtype,
                      int(k.shape[3]), int(k.shape[1]), num_heads=int(q.shape[1]), paged=True,
                      block_size=k.shape[2], window_left=window_left, softcap=float(softcap),
                      cache_contiguous=contiguous)
    return backend_reason(config, options.backend_choice, options.only_if_faster is not False)


def _all_after(writers, mask: Node) -> bool:
    """Every writer comes after ``mask`` in the graph (so the mask read the value before)."""
    seen_mask = False
    pending = set(writers)
    for node in mask.graph.nodes:
        if node is mask:
            seen_mask = True
        elif node in pending and not seen_mask:
            return False
    return seen_mask


def _snapshot(graph: Graph, pos: Node) -> Node:
    """A copy of ``pos`` taken before any write to it (one per input, shared by every layer)."""
    for user in pos.users:
        if user.meta.get(_SNAPSHOT_META):
            return user
    first_op = next(n for n in graph.nodes if n.op != "placeholder")  # inputs stay first
    with graph.inserting_before(first_op):
        copy = graph.call_function(torch.ops.aten.clone.default, (pos,))
    val = meta_val(pos)
    with getattr(val, "fake_mode", None) or torch._subclasses.fake_tensor.unset_fake_temporarily():
        copy_val = torch.ops.aten.clone.default(val)
    for key in [k for k in ("val", "example_value") if k in pos.meta] or ["val"]:
        copy.meta[key] = copy_val
    copy.meta[_SNAPSHOT_META] = True
    return copy


def emit_over_cache(graph: Graph, anchor: Node, plan: dict,
                    counters: tuple[str, str] = (DECODE_COUNTER, PREFILL_COUNTER),
                    emit=emit_cache_attention) -> tuple[Node, str]:
    """Emit the planned op before ``anchor`` (the SDPA call, or the hand-written pass's
    placeholder) with ``emit`` (:func:`emit_cache_attention`'s arguments); return its output
    node and the counter to bump (``counters``: for a decode, for a prefill)."""
    plan = dict(plan)
    if plan.pop("snapshot"):
        plan["pos"] = _snapshot(graph, plan["pos"])
    one = same(meta_val(plan["q"]).shape[2], 1)
    return emit(graph, anchor, **plan), counters[0] if one else counters[1]
