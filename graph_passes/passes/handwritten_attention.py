"""Hand-written attention -> ``attn.prefill``: Inductor's joint-graph pre-pass.

Installed as ``joint_custom_pre_pass``, it runs on the aten graph right after AOT autograd and
before Inductor's own ``fuse_attention`` patterns (which would turn the same code into SDPA),
matching the eager forms of :mod:`.attention_forms` with Inductor's pattern matcher (see
:mod:`.pattern_matching`). Training graphs (with tangents) are left alone: the op has no
backward.
"""

from __future__ import annotations

import torch
from torch.fx import Graph

from graph_passes.passes.base import AttentionPass
from graph_passes.passes.pattern_matching import (PASS_NAME, apply_attention_patterns,
                                                  candidate_forms)
from graph_passes.rewrite.eligibility import left_alone

aten = torch.ops.aten


def _is_training_graph(graph: Graph) -> bool:
    return any(n.op == "placeholder" and str(n.target).startswith("tangents")
               for n in graph.nodes)


def _feeds_bmm(node, depth: int = 8) -> bool:
    frontier = list(node.users)
    for _ in range(depth):
        if any(n.target is aten.bmm.default for n in frontier):
            return True
        frontier = [u for n in frontier for u in n.users]
    return False


def log_unmatched_softmax(graph: Graph) -> None:
    """Debug-log each softmax that still feeds a batched matmul: attention left as written."""
    for amax in graph.find_nodes(op="call_function", target=aten.amax.default):
        if _feeds_bmm(amax):
            left_alone(PASS_NAME, f"the softmax at {amax.name}",
                       "no attention form of the table matched it exactly (dropout, another "
                       "mask or scale form, or a check logged above)")


class HandwrittenAttentionPass(AttentionPass):
    """Joint-graph pre-pass: ``torch.compile`` runs it on the aten graph before fuse_attention."""

    name = PASS_NAME

    def run(self, graph: Graph) -> int:
        if not self.options.handwritten:
            return 0
        if _is_training_graph(graph):
            if candidate_forms(graph, "inductor"):
                left_alone(PASS_NAME, "the attention in this graph",
                           "it is a training graph (the op has no backward)")
            return 0
        from torch._inductor.fx_passes.post_grad import remove_noop_ops
        remove_noop_ops(graph)  # as fwd_only did to the patterns (Inductor runs it next anyway)
        count = apply_attention_patterns(graph, self.options, "inductor")
        log_unmatched_softmax(graph)
        return count
