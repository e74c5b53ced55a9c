"""``attn.prefill`` / ``attn.decode`` -> their ``triton_op`` counterparts, when Triton serves them.

A pre-grad pass of ``torch.compile(model, backend="attn_ops")``. It runs with the attn backend
choice of the compile fixed (the compile backend compiles once per choice and picks the
artifact by the choice in force at each call: a change of ``use_backend`` is a recompile, not a
Python dispatch per op call; see :mod:`graph_passes.compile_backend`). A call whose backend
resolves to Triton for its traced configuration becomes ``torch.ops.attn_triton.<op>``
(:mod:`attn_ops.backends.triton.triton_ops`), which AOTAutograd traces into: Inductor then
launches our Triton kernels from its generated code (and AOTInductor packages carry them).

Left alone, with a debug log saying why: calls on another backend, on devices other than those
Inductor compiles user Triton kernels for (CUDA; the CPU interpreter runs only eagerly), with
symbolic shapes (the kernel wrappers plan launches from static sizes), with sinks / FP8 scales
(the Triton kernels refuse them), and every call while ``ATTN_OPS_CHECK=1`` asks for the data
checks, which only the attn op runs.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from attn_ops import checks, contract, registry
from graph_passes.fx_nodes import meta_val
from graph_passes.passes.base import AttentionPass
from graph_passes.rewrite.eligibility import log

PASS_NAME = "inline_triton"
# Counted apart from counters["graph_passes"], which reports substituted attention: here the
# attention already is an attn op, and inlining only changes who launches its kernel.
INLINED_COUNTERS = "inline_triton"  # counters[INLINED_COUNTERS][op]: calls inlined
KEPT_COUNTERS = "inline_triton_kept_extern"  # counters[KEPT_COUNTERS][op]: calls not inlined
_OPS = {"prefill": 12, "decode": 8}  # op -> arguments its triton_op counterpart takes


def _attn_op(node: Node) -> str | None:
    """"prefill" / "decode" for a call of ``torch.ops.attn.prefill``/``decode`` (either form)."""
    if node.op != "call_function":
        return None
    target = node.target
    packet = getattr(target, "overloadpacket", target)
    if getattr(packet, "_qualified_op_name", None) in ("attn::prefill", "attn::decode"):
        if isinstance(target, torch._ops.OpOverload) and target._overloadname != "default":
            return None
        return packet._qualified_op_name.split("::")[1]
    return None


def _static(t) -> bool:
    return isinstance(t, torch.Tensor) and all(isinstance(s, int) for s in (*t.shape,
                                                                           *t.stride()))


class InlineTritonPass(AttentionPass):
    """Swap attn ops that Triton serves (under ``choice``) for their ``triton_op`` form.

    Args:
        options: the substitution options (their ``attn_backend`` wins over ``choice``).
        choice: the attn backend choice this compile is for ("auto", "triton", ...).
        devices: device types to lower on (CUDA: where Inductor compiles Triton kernels).
    """

    name = PASS_NAME

    def __init__(self, options=None, choice: str | None = None, devices=("cuda",)):
        super().__init__(options)
        self.choice = self.options.backend_choice or choice or registry.current_choice()
        self.devices = tuple(devices)

    def uuid(self) -> str:
        return f"{super().uuid()}|choice={self.choice}|devices={self.devices}"

    def decide(self, node: Node, op: str) -> str | None:
        """None when ``node`` may run on the Triton kernels inline, else the reason not."""
        args = list(node.args) + [None] * 16
        if node.kwargs:
            return "it passes keyword arguments"
        q, k = meta_val(args[0]), meta_val(args[1])
        if not (_static(q) and _static(k)):
            return "its shapes are symbolic or unknown"
        if q.device.type not in self.devices:
            return f"it runs on {q.device.type} (lowered on {', '.join(self.devices)})"
        extras = args[_OPS[op]:_OPS[op] + 3]  # sinks, k_scale, v_scale
        if any(a is not None for a in extras):
            return "it passes sinks or FP8 scales"
        if any(isinstance(a, Node) and not isinstance(meta_val(a), torch.Tensor)
               for a in args[5:_OPS[op]]):
            return "a scalar argument is not a constant"
        if checks._env_check() not in checks._CHECK_OFF:
            return "ATTN_OPS_CHECK=1 asks for the data checks, which only the attn op runs"
        if op == "prefill":
            block_table = meta_val(args[9])
            config = contract.prefill_config(q, k, args[8] if args[8] is not None else True,
                                             block_table, _const(args[10], -1),
                                             _const(args[11], 0.0), max_seqlen_k=args[6])
        else:
            config = contract.decode_config(q, k, _const(args[6], -1), _const(args[7], 0.0))
        try:
            module = registry.select(config, self.choice)
        except registry.BackendUnavailable as e:
            return str(e)
        if module.name != "triton":
            return f"backend {module.name!r} serves it under choice {self.choice!r}"
        if op == "prefill" and module.prefill_route(
                q, k, meta_val(args[3]), _const(args[5], 0), config.causal, block_table,
                config.window_left, config.softcap) in ("hopper", "split"):
            return "the Triton backend serves it on its Gluon Hopper kernel (not inlinable)"
        return None

    def run(self, graph: Graph) -> int:
        count = 0
        for node in list(graph.nodes):
            op = _attn_op(node)
            if op is None:
                continue
            reason = self.decide(node, op)
            if reason is not None:
                from torch._dynamo.utils import counters
                counters[KEPT_COUNTERS][op] += 1
                log.debug("%s: kept attn.%s %s as an extern call because %s", PASS_NAME, op,
                          node.name, reason)
                continue
            from attn_ops.backends.triton import triton_ops  # imports triton
            target, nargs = triton_ops.COUNTERPARTS[op]
            node.target = target
            node.args = tuple(node.args[:nargs])
            count += 1
            from torch._dynamo.utils import counters
            counters[INLINED_COUNTERS][op] += 1
        if count:
            graph.lint()
        return count


def _const(value, default):
    return default if value is None else value
