"""Decompose ``torch.ops.attn.*`` into visible ``torch.ops.npu`` calls for torchair graph capture.

Why: in torchair's reduce-overhead / npugraph_ex modes (ACL graphs), a captured FIA call keeps the
lengths it was captured with, unless the FIA node is *visible* in the graph and its
``actual_seq_qlen`` / ``actual_seq_kvlen`` entries are graph inputs: torchair then rewrites them at
each replay. An opaque ``attn::prefill`` / ``attn::decode`` node would freeze the first lengths
(and its eager kernel's ``.tolist()`` cannot run inside a capture anyway).

What: :func:`decompose_attn_ops` rewrites each attn node of an FX graph into the npu backend's
own lowering (``attn_ops.backends.npu.lowering``, traced with ``torch.fx.Proxy`` so the graph
holds exactly the calls eager mode makes), and lifts the lengths that FIA needs as host lists into
new graph inputs (one per sequence, SymInt). :func:`decomposing_backend` wraps a compiler backend
(``torchair.get_npu_backend(...)``; any ``(gm, example_inputs)`` backend works, which is how the
CPU tests run it): it runs the pass, gives the new inputs SymInt example values so that they stay
graph inputs through AOTAutograd, and at every call copies the length tensors to the host (one
device-to-host transfer for all layers) and appends them to the arguments.

Requirements (checked, with a clear :class:`DecomposeError`): the length tensors (``cu_seqlens_q``,
``cu_seqlens_k``, ``seqlens_k``) are inputs of the graph, the batch size is static (a captured
graph is per batch size anyway: ``mark_static`` it or compile with ``dynamic=False``), scalar
arguments are constants. In graph mode prefill is not sliced: ``cu_seqlens_q[-1]`` must equal the
token count (and ``cu_seqlens_k[-1]`` the key count without a block table), which FIA itself
enforces. torch_npu 2.13 documents FIA's TND layout (prefill) as unsupported under reduce-overhead;
decode (BNSD) and the store are what this pass is for.

Importing this module does not import torchair or torch_npu; the pass needs the torch_npu ops to
be registered (torch_npu loaded, or the tests' emulator) when it runs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function
from torch.fx.proxy import GraphAppendingTracer

from attn_ops.backends.npu import lowering

COUNTER = "attn_npu_decompose"
# kind of lifted lengths -> host transform of the source tensor's values
_KINDS = {
    "q_ends": lowering.q_ends_from_cu,
    "kv_ends": lambda cu: lowering.kv_lens_from_cu(cu, paged=False),
    "kv_lens": lambda cu: lowering.kv_lens_from_cu(cu, paged=True),
    "seqlens": list,
}


class DecomposeError(RuntimeError):
    """An attn node that cannot be decomposed for torchair graph capture (the message says why)."""


@dataclass(frozen=True)
class LiftedLengths:
    """``count`` host ints derived from graph input ``source_index`` and fed back as inputs."""
    source_index: int
    kind: str
    count: int


@dataclass
class Decomposed:
    """Result of :func:`decompose_attn_ops`: the rewritten module and its extra inputs."""
    graph_module: fx.GraphModule
    lifted: list[LiftedLengths] = field(default_factory=list)
    replaced: dict[str, int] = field(default_factory=dict)

    @property
    def num_extra_inputs(self) -> int:
        return sum(item.count for item in self.lifted)

    def host_lengths(self, inputs) -> list[int]:
        """The extra graph inputs for a call with ``inputs``: ONE device-to-host copy in all."""
        if not self.lifted:
            return []
        sources = sorted({item.source_index for item in self.lifted})
        tensors = [inputs[i].reshape(-1).to(torch.int64) for i in sources]
        values = torch.cat(tensors).tolist()  # the host sync torch_npu requires
        by_source, start = {}, 0
        for i, t in zip(sources, tensors):
            by_source[i] = values[start:start + t.numel()]
            start += t.numel()
        out = []
        for item in self.lifted:
            lens = _KINDS[item.kind](by_source[item.source_index])
            if len(lens) != item.count:
                raise DecomposeError(f"graph input {item.source_index} now yields {len(lens)} "
                                     f"lengths, the graph was built for {item.count}")
            out.extend(lens)
        return out

    def example_lengths(self, example_inputs) -> list:
        """SymInt example values for the extra inputs (so tracing keeps them as inputs)."""
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        shape_env = getattr(fake_mode, "shape_env", None)
        if shape_env is None:
            raise DecomposeError("decomposing for torchair needs symbolic shapes (a ShapeEnv on "
                                 "the example inputs), so the lifted lengths stay graph inputs "
                                 "instead of constants")
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic
        out = []
        for item in self.lifted:
            for i in range(item.count):
                hint = i + 1 if item.kind in ("q_ends", "kv_ends") else 1
                name = f"attn_npu_{item.kind}_{item.source_index}_{i}"
                out.append(shape_env.create_unspecified_symint_and_symbol(
                    hint, ConstantSource(name), DimDynamic.DYNAMIC))
        return out


_ATTN_OPS = ("store_kvcache", "prefill", "decode")


def _attn_op_name(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    for name in _ATTN_OPS:
        packet = getattr(torch.ops.attn, name)
        if node.target is packet or node.target is packet.default:
            return name
    return None


def _val(node):
    """Example value of an FX node (``val`` after AOT, ``example_value`` in Dynamo graphs)."""
    if not isinstance(node, fx.Node):
        return node
    for key in ("val", "example_value"):
        if key in node.meta:
            return node.meta[key]
    raise DecomposeError(f"node {node.name} has no example value (meta 'val'); run the pass on a "
                         f"graph traced by Dynamo, make_fx or torch.export")


def _static_int(value, what: str, node: fx.Node) -> int:
    if isinstance(value, torch.SymInt):
        value = value.node.maybe_as_int()
    if not isinstance(value, int):
        raise DecomposeError(f"{node.name}: {what} must be static for torchair capture, got "
                             f"{value} (mark it static, or compile with dynamic=False)")
    return value


def _constant(value, what: str, node: fx.Node):
    if isinstance(value, (fx.Node, torch.SymInt, torch.SymFloat)):
        raise DecomposeError(f"{node.name}: {what} must be a constant to decompose, got {value}")
    return value


class _Rewriter:
    """Rewrites the attn nodes of one graph; owns the lifted-length placeholders."""

    def __init__(self, gm: fx.GraphModule, store_impl: str | None):
        self.gm, self.graph = gm, gm.graph
        self.store_impl = store_impl
        self.placeholders = list(self.graph.find_nodes(op="placeholder"))
        self.lifted: dict[tuple[int, str], list[fx.Node]] = {}
        self.order: list[LiftedLengths] = []
        self.anchor = self.placeholders[-1] if self.placeholders else None  # last input so far
        self.tracer = GraphAppendingTracer(self.graph)

    def proxy(self, value):
        return fx.Proxy(value, self.tracer) if isinstance(value, fx.Node) else value

    def lengths(self, source: fx.Node, kind: str, count: int, node: fx.Node) -> list[fx.Proxy]:
        """Placeholders holding the ``count`` host lengths of graph input ``source``."""
        if not (isinstance(source, fx.Node) and source.op == "placeholder"):
            raise DecomposeError(
                f"{node.name}: the lengths come from {source}, which is computed inside the "
                f"graph; torchair capture needs them as host values, so pass cu_seqlens / "
                f"seqlens_k as inputs of the compiled function (or use max-autotune, whose GE "
                f"converters take lengths as tensors)")
        index = self.placeholders.index(source)
        key = (index, kind)
        if key not in self.lifted:
            nodes = []
            for i in range(count):
                with self.graph.inserting_after(self.anchor):
                    ph = self.graph.placeholder(f"attn_npu_{kind}_{source.name}_{i}")
                if hasattr(source, "_dynamo_source"):  # AOT expects it on Dynamo placeholders
                    ph._dynamo_source = None
                nodes.append(ph)
                self.anchor = ph
            self.lifted[key] = nodes
            self.order.append(LiftedLengths(index, kind, count))
        return [self.proxy(n) for n in self.lifted[key]]

    def rewrite(self, node: fx.Node, op: str) -> None:
        kw = normalize_function(getattr(torch.ops.attn, op).default, node.args, node.kwargs,
                                normalize_to_only_use_kwargs=True).kwargs
        with self.graph.inserting_before(node):
            out = getattr(self, "_" + op)(node, kw)
        if out is not None:
            for key in ("val", "example_value", "tensor_meta"):  # same value: later attn nodes
                if key in node.meta:                              # read their inputs' shapes
                    out.node.meta[key] = node.meta[key]
            node.replace_all_uses_with(out.node)
        if node.users:
            raise DecomposeError(f"{node.name}: still used after decomposition")
        self.graph.erase_node(node)

    def _store_kvcache(self, node, kw):
        t = _val(kw["key"]).shape[0]  # may be symbolic: only a static 0 is skipped
        block_size = _static_int(_val(kw["k_cache"]).shape[1], "block_size", node)
        impl = self.store_impl or lowering.available_store_impl()
        if impl is None:
            raise DecomposeError("no torch_npu cache-store op is registered")
        if not (isinstance(t, int) and t == 0):
            p = self.proxy
            lowering.store(p(kw["key"]), p(kw["value"]), p(kw["k_cache"]), p(kw["v_cache"]),
                           p(kw["slot_mapping"]), impl, block_size)
        return None

    def _prefill(self, node, kw):
        q, k = _val(kw["q"]), _val(kw["k"])
        paged = kw["block_table"] is not None
        h, d = _static_int(q.shape[1], "H", node), _static_int(q.shape[2], "D", node)
        hkv = _static_int(k.shape[2] if paged else k.shape[1], "Hkv", node)
        bs = _static_int(k.shape[1], "block_size", node) if paged else 0
        spec = lowering.prefill_spec(
            h, hkv, d, bs, _constant(kw["scale"], "scale", node),
            _constant(kw["causal"], "causal", node),
            _constant(kw["window_left"], "window_left", node),
            _constant(kw["softcap"], "softcap", node))
        b = _static_int(_val(kw["cu_seqlens_q"]).shape[0], "B + 1", node) - 1
        p = self.proxy
        if b == 0:
            return torch.zeros_like(p(kw["q"]))
        q_ends = self.lengths(kw["cu_seqlens_q"], "q_ends", b, node)
        kv = self.lengths(kw["cu_seqlens_k"], "kv_lens" if paged else "kv_ends", b, node)
        mask = lowering.build_compressed_causal_mask(p(kw["q"])) if spec.sparse_mode else None
        return lowering.prefill_fia(p(kw["q"]), p(kw["k"]), p(kw["v"]), p(kw["block_table"]),
                                    mask, q_ends, kv, spec)

    def _decode(self, node, kw):
        q, cache = _val(kw["q"]), _val(kw["k_cache"])
        b = _static_int(q.shape[0], "the batch size B", node)
        spec = lowering.decode_spec(
            _static_int(q.shape[1], "H", node), _static_int(cache.shape[2], "Hkv", node),
            _static_int(q.shape[2], "D", node), _static_int(cache.shape[1], "block_size", node),
            _constant(kw["scale"], "scale", node),
            _constant(kw["window_left"], "window_left", node),
            _constant(kw["softcap"], "softcap", node))
        p = self.proxy
        if b == 0:
            return torch.zeros_like(p(kw["q"]))
        kv = self.lengths(kw["seqlens_k"], "seqlens", b, node)
        return lowering.decode_fia(p(kw["q"]), p(kw["k_cache"]), p(kw["v_cache"]),
                                   p(kw["seqlens_k"]), p(kw["block_table"]), kv, spec)


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy to rewrite: Dynamo still reads the graph it handed to the backend afterwards."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, val_map))
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    for old, new in val_map.items():
        if hasattr(old, "_dynamo_source"):  # AOTAutograd reads it off Dynamo's placeholders
            new._dynamo_source = old._dynamo_source
    out = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.meta = dict(getattr(gm, "meta", {}))
    if hasattr(gm, "_param_name_to_source"):
        out._param_name_to_source = gm._param_name_to_source
    return out


def decompose_attn_ops(gm: fx.GraphModule, *, store_impl: str | None = None) -> Decomposed:
    """Rewrite every ``torch.ops.attn.*`` node of a copy of ``gm`` into torch_npu calls.

    Args:
        gm: a graph from Dynamo, ``make_fx`` or ``torch.export`` (nodes carry example values).
        store_impl: force one cache-store op of ``lowering.STORE_IMPLS``; None takes the
            first one torch_npu has.

    Returns:
        :class:`Decomposed`: the rewritten copy (``gm`` itself is left as it is) with extra
        trailing inputs, one per lifted length (call it with
        ``[*inputs, *result.host_lengths(inputs)]``), what was lifted, and counts. The counts
        are also added to ``torch._dynamo.utils.counters["attn_npu_decompose"]``.
    """
    from torch._dynamo.utils import counters

    gm = _copy_graph_module(gm)
    rewriter = _Rewriter(gm, store_impl)
    replaced: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        op = _attn_op_name(node)
        if op is None:
            continue
        rewriter.rewrite(node, op)
        replaced[op] = replaced.get(op, 0) + 1
        counters[COUNTER][op] += 1
    gm.graph.lint()
    gm.recompile()
    return Decomposed(gm, list(rewriter.order), replaced)


def decomposing_backend(inner, *, store_impl: str | None = None):
    """A ``torch.compile`` backend: :func:`decompose_attn_ops`, then ``inner`` (e.g. torchair's).

    The returned callable feeds the lifted lengths at every call (one host copy for all layers),
    so a graph captured by ``inner`` replays with the current lengths.
    """
    def backend(gm: fx.GraphModule, example_inputs):
        result = decompose_attn_ops(gm, store_impl=store_impl)
        if not result.lifted:
            return inner(result.graph_module, example_inputs)
        extra = result.example_lengths(example_inputs)
        compiled = inner(result.graph_module, [*example_inputs, *extra])

        def run(*args):  # Dynamo calls backends' results with positional arguments
            return compiled(*args, *result.host_lengths(args))

        return run

    return backend
