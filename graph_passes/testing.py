"""Seeing what the passes do without Inductor's code generation (tests, debugging).

* :func:`inspecting_backend` -- a Dynamo backend that runs exactly our passes at the points
  Inductor runs them (SDPA pass on the Dynamo graph, pattern pass on the aten graph AOT autograd
  produces with Inductor's decompositions), keeps both graphs, and runs the result eagerly. It
  compiles in well under a second where Inductor takes seconds (C++ codegen on CPU).
* :func:`graph_text` -- a graph as short, stable text for expecttest goldens: nodes renumbered
  in order, targets by qualified name, float literals rounded.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch.fx import Graph, Node

from graph_passes.options import SubstitutionOptions
from graph_passes.passes.handwritten_attention import HandwrittenAttentionPass
from graph_passes.passes.sdpa_to_prefill import SdpaToPrefillPass


def inspecting_backend(options: SubstitutionOptions | dict | None = None,
                       graphs: dict | None = None):
    """A Dynamo backend: our two passes, no Inductor codegen; graphs land in ``graphs``.

    ``graphs["dynamo"]`` is the Dynamo graph after the SDPA pass (``graphs["dynamo_before"]``
    a copy from before it), ``graphs["aten"]`` the aten forward graph after the hand-written
    pass (``graphs["aten_before"]`` from before it): the graph Inductor would lower.
    """
    from functorch.compile import default_partition, make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    opts = SubstitutionOptions.coerce(options)
    graphs = {} if graphs is None else graphs

    def joint_pass(gm: torch.fx.GraphModule) -> None:
        graphs["aten_before"] = copy.deepcopy(gm.graph)
        HandwrittenAttentionPass(opts)(gm.graph)
        gm.recompile()
        graphs["aten"] = gm

    def inference_compiler(gm: torch.fx.GraphModule, example_inputs):
        joint_pass(gm)  # Inductor runs its joint-graph passes on the inference graph too
        return make_boxed_func(gm.forward)

    def partition(gm: torch.fx.GraphModule, joint_inputs, **kwargs):
        joint_pass(gm)  # training: the joint graph, as Inductor's partitioner wrapper does
        return default_partition(gm, joint_inputs, **kwargs)

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs["dynamo_before"] = copy.deepcopy(gm.graph)
        SdpaToPrefillPass(opts)(gm.graph)
        gm.recompile()
        graphs["dynamo"] = gm
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward),
                            inference_compiler=inference_compiler, partition_fn=partition,
                            decompositions=select_decomp_table())(gm, example_inputs)
    return backend


def _target_name(node: Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f".{t}"
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(t)
    if getattr(t, "__module__", None) == operator.__name__ or t in vars(operator).values():
        return f"operator.{t.__name__}"
    module = getattr(t, "__module__", None) or ""
    if module.startswith("torch"):
        return f"torch.{t.__name__}"
    return getattr(t, "__qualname__", repr(t))


def graph_text(graph: Graph | torch.fx.GraphModule, keep=None) -> str:
    """One line per call node: ``v3 = aten.transpose.int(v2, 1, 2)``; inputs are ``in0, in1, ...``.

    Args:
        graph: a Graph or GraphModule.
        keep: optional predicate on nodes; others are still numbered but not printed.
    """
    graph = graph.graph if isinstance(graph, torch.fx.GraphModule) else graph
    names: dict[Node, str] = {}
    lines = []

    def fmt(x):
        if isinstance(x, Node):
            return names.get(x, "?")
        if isinstance(x, float):
            return f"{x:.4g}"
        if isinstance(x, (list, tuple)):
            inner = ", ".join(fmt(i) for i in x)
            return f"[{inner}]" if isinstance(x, list) else f"({inner})"
        if isinstance(x, torch.device):
            return "device"
        if isinstance(x, slice):
            return f"{fmt(x.start)}:{fmt(x.stop)}" + ("" if x.step is None else f":{fmt(x.step)}")
        return str(x)

    n_in = n_v = 0
    for node in graph.nodes:
        if node.op == "placeholder":
            names[node] = f"in{n_in}"
            n_in += 1
            continue
        if node.op == "output":
            lines.append(f"return {fmt(node.args[0])}")
            continue
        names[node] = f"v{n_v}"
        n_v += 1
        if keep is not None and not keep(node):
            continue
        args = [fmt(a) for a in node.args]
        args += [f"{k}={fmt(v)}" for k, v in node.kwargs.items() if k not in ("device", "layout",
                                                                              "pin_memory")]
        lines.append(f"{names[node]} = {_target_name(node)}({', '.join(args)})")
    return "\n".join(lines)
