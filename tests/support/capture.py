"""Shared by the export, AOTInductor, Inductor in-place and CUDA-graph tests.

* The example model (examples/paged_attention_model.py) imported by path: examples are not a
  package, and the tests must exercise exactly the code users read.
* A planned schedule of serving steps (prefill, chunked prefill with a cached prefix, decode
  with padding, a wider block table, batch 1) whose token counts, batch sizes and table widths
  all change from step to step, so a program that froze any of them fails.
* A detector of KV-cache copies in generated code (Inductor's Python wrapper, Triton or C++
  kernels, AOTInductor's C++ wrapper).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import paged_attention_model as pam  # noqa: E402

from attn_ops import PagedKVCache  # noqa: E402

# Tiny on purpose: every exported / compiled program below is built from this configuration,
# and AOTInductor compiles C++ for each (about 12-25 s per package on a 2-core CPU).
CFG = pam.LayerConfig(hidden=32, num_heads=4, num_kv_heads=2, head_dim=16, num_blocks=16,
                      block_size=4, dtype=torch.float32)
MAX_SEQ_LEN = 24  # block-table width 6


@dataclass
class Step:
    """One serving step: which module runs it and its positional arguments."""
    kind: str  # "prefill" or "decode"
    args: tuple

    def to(self, device) -> "Step":
        return Step(self.kind, tuple(a.to(device) for a in self.args))


def widen(table: torch.Tensor, extra: int) -> torch.Tensor:
    """Append ``extra`` garbage block-table columns (-7): ops must ignore entries past a
    sequence's last block, and a program must accept the new width."""
    pad = torch.full((table.shape[0], extra), -7, dtype=table.dtype, device=table.device)
    return torch.cat([table, pad], dim=1)


def plan_schedule(cfg: pam.LayerConfig = CFG, seed: int = 0) -> tuple[list[Step], torch.Tensor,
                                                                        torch.Tensor]:
    """A serving schedule and the initial (random) caches it starts from, on CPU.

    Steps: prefill {a: 5, b: 3} (T=8, B=2); decode [a, b]; decode [a, b] padded to 3 rows;
    chunked prefill {a: 2 more, c: 7 new} (T=9, B=2; a attends to its cached prefix);
    decode [a, b, c] with 3 extra garbage block-table columns; decode [c] (B=1).
    """
    gen = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(cfg.num_blocks, cfg.block_size, cfg.num_kv_heads, cfg.head_dim,
                         max_seq_len=MAX_SEQ_LEN, dtype=cfg.dtype)
    k0 = torch.randn(cache.k_cache().shape, generator=gen, dtype=cfg.dtype)
    v0 = torch.randn(cache.v_cache().shape, generator=gen, dtype=cfg.dtype)

    def tokens(n):
        return torch.randn(n, cfg.hidden, generator=gen, dtype=cfg.dtype)

    def prefill(new):
        x = tokens(sum(new.values()))
        return Step("prefill", pam.prefill_inputs(cache.prepare_prefill(new), x))

    def decode(ids, pad_to=None, extra_cols=0):
        batch = cache.prepare_decode(ids, pad_to=pad_to)
        args = pam.decode_inputs(batch, tokens(pad_to or len(ids)))
        return Step("decode", args[:3] + (widen(args[3], extra_cols),))

    steps = [prefill({"a": 5, "b": 3}), decode(["a", "b"]), decode(["a", "b"], pad_to=3),
             prefill({"a": 2, "c": 7}), decode(["a", "b", "c"], extra_cols=3), decode(["c"])]
    return steps, k0, v0


def make_layer(k_cache: torch.Tensor, v_cache: torch.Tensor, cfg: pam.LayerConfig = CFG,
               seed: int = 1) -> pam.PagedAttention:
    """The example layer with seeded weights, bound (no copy) to the given caches."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = pam.PagedAttention(cfg, k_cache, v_cache)
    return layer.to(k_cache.device)  # moves the weights; the caches are already there


def steps_of(layer: pam.PagedAttention) -> dict:
    return {"prefill": pam.PrefillStep(layer), "decode": pam.DecodeStep(layer)}


def run_schedule(runners: dict, steps: list[Step]) -> list[torch.Tensor]:
    """Run every step with ``runners[step.kind]``; returns the outputs (cloned)."""
    outs = []
    with torch.no_grad():
        for step in steps:
            outs.append(runners[step.kind](*step.args).clone())
    return outs


def eager_reference(steps: list[Step], k0: torch.Tensor, v0: torch.Tensor, cfg=CFG):
    """Outputs and final caches of the schedule in eager mode on the reference backend."""
    from attn_ops import use_backend

    layer = make_layer(k0.clone(), v0.clone(), cfg)
    with use_backend("reference"):
        outs = run_schedule(steps_of(layer), steps)
    return outs, layer.k_cache, layer.v_cache


@pytest.fixture(scope="module")
def schedule():
    """Fixture: ``plan_schedule()`` once per test module (import it into the module)."""
    return plan_schedule()


@pytest.fixture(scope="module")
def reference(schedule):
    """Fixture: ``eager_reference`` of the module's schedule."""
    steps, k0, v0 = schedule
    return eager_reference(steps, k0, v0)


def substitution_pass():
    """``graph_passes.substitute_attention`` and None, or None and why it is absent
    (another engineer's pass: only the SDPA tests depend on it)."""
    try:
        from graph_passes import substitute_attention
    except ImportError as e:
        return None, f"graph_passes.substitute_attention not importable: {e}"
    return substitute_attention, None


def assert_schedule_matches(outs, k_cache, v_cache, reference, steps, tol, what="") -> None:
    """Every step's output and the final caches equal ``eager_reference``'s (NaN rejected)."""
    from tests.support.helpers import assert_close

    ref_outs, ref_k, ref_v = reference
    assert len(outs) == len(ref_outs) == len(steps)
    for i, (out, ref) in enumerate(zip(outs, ref_outs)):
        assert_close(out, ref, *tol, what=f"{what}step {i} ({steps[i].kind})")
    assert_close(k_cache, ref_k, *tol, what=f"{what}k_cache")
    assert_close(v_cache, ref_v, *tol, what=f"{what}v_cache")


def example_step_args(steps: list[Step], kind: str) -> tuple:
    """Arguments of the first step of ``kind`` whose sizes are all >= 2 (export's examples)."""
    return next(s.args for s in steps if s.kind == kind and s.args[0].shape[0] >= 2)


# ---------------------------------------------------------------------------------------------
# Cache-copy detector for generated code
# ---------------------------------------------------------------------------------------------

# Inductor's Python wrapper: ``buf3 = empty_strided_cpu((6656, ), (1, ), torch.float32)``.
_PY_ALLOC = re.compile(r"empty_strided_\w+\(\(([^()]*)\)")
# AOTInductor's C++ wrapper: ``int_array_3[] = {13L, 4L, 2L, 16L};`` then
# ``aoti_torch_empty_strided(4, int_array_3, ...)``.
_CPP_ARRAY = re.compile(r"(int_array_\d+)\[\]\s*=\s*\{([^{}]*)\}")
_CPP_ALLOC = re.compile(r"aoti_torch_empty_strided\(\s*\d+\s*,\s*(int_array_\d+)")
# Names Inductor gives copies: kernels fused from aten.clone / aten.copy_ carry the op names
# (``cpp_fused_as_strided_clone_1``, ``triton_poi_fused_copy__0``), extern calls spell them.
_COPY_WORD = re.compile(r"clone|copy_|aoti_torch_copy")
_BOILERPLATE = ("allow_h2d_copy",)  # AOTI constant loading flags, not a copy of a buffer
# AOTInductor's CUDA wrapper guards every input it compiled as 16-byte aligned:
# ``if (data_ptr & 15) { AOTI_TORCH_WARN(...); aoti_torch_clone_preserve_strides(x, &x_aligned); }``
# (torch/_inductor/codegen/cpp_wrapper_gpu.py, codegen_inputs). That clone runs only for a
# misaligned input, with a warning; caching-allocator tensors are 512-byte aligned. The peak-memory
# checks still catch a copy that does run.
_ALIGNMENT_GUARD = re.compile(r"aoti_torch_clone_preserve_strides\((\w+), &\1_aligned\)")


def _numel(dims: str) -> int | None:
    """Product of a comma-separated list of integer literals; None if any size is symbolic."""
    sizes = [d.strip().rstrip("L") for d in dims.split(",") if d.strip()]
    if not sizes or not all(s.isdigit() for s in sizes):
        return None
    return math.prod(int(s) for s in sizes)


def cache_copies(code: str, cache_numel: int) -> list[str]:
    """Lines of generated code that copy a buffer or allocate one as large as a KV cache.

    Args:
        code: an Inductor output module (Python, with Triton / C++ kernel sources inline) or an
            AOTInductor C++ wrapper.
        cache_numel: elements of one cache; an allocation of at least this many elements can
            only be a cache copy here, because the test models' activations are far smaller.

    Returns:
        The offending lines (empty when the caches are written in place).
    """
    arrays = {name: _numel(dims) for name, dims in _CPP_ARRAY.findall(code)}
    found = []
    for line in code.splitlines():
        stripped = line.strip()
        if stripped.startswith(("#", "//")):
            continue  # comments: provenance (the source ops' names), compile commands (paths)
        if _ALIGNMENT_GUARD.search(line):
            continue
        if _COPY_WORD.search(line) and not any(b in line for b in _BOILERPLATE):
            found.append(stripped)
            continue
        sizes = [_numel(m) for m in _PY_ALLOC.findall(line)]
        sizes += [arrays.get(m) for m in _CPP_ALLOC.findall(line)]
        if any(n is not None and n >= cache_numel for n in sizes):
            found.append(stripped)
    return found


# ---------------------------------------------------------------------------------------------
# A normalised view of the attn calls in an exported / traced graph (for expecttest goldens)
# ---------------------------------------------------------------------------------------------

_FUNCTIONALIZERS = ("auto_functionalized", "auto_functionalized_v2")


def _attn_call(node: torch.fx.Node):
    """(op name, {arg: value}, functionalized?) for a call of an attn op, else None."""
    from torch.fx.operator_schemas import normalize_function

    target = node.target
    if getattr(target, "name", None) in _FUNCTIONALIZERS or \
            getattr(target, "__name__", None) in _FUNCTIONALIZERS:
        op, kwargs = node.args[0], dict(node.kwargs)
        bases = kwargs.pop("_all_bases", None)
        for key in [k for k in kwargs if k.startswith("_") and k.endswith("_base_index")]:
            kwargs[key[1:-len("_base_index")]] = bases[kwargs.pop(key)]
        for key in [k for k in kwargs if k.startswith("_")]:
            kwargs.pop(key)  # view metadata of v2 (sizes, strides, offsets)
        order = [a.name for a in op._schema.arguments]
        return op, {k: kwargs[k] for k in order if k in kwargs}, True
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "attn":
        norm = normalize_function(target, node.args, node.kwargs,
                                  normalize_to_only_use_kwargs=True)
        return target, dict(norm.kwargs), False
    return None


def _origin(value, labels: dict) -> str:
    if isinstance(value, torch.fx.Node):
        if value in labels:
            return labels[value]
        if value.op == "placeholder":
            return value.name
        return "<" + str(getattr(value.target, "__name__", value.target)).split(".")[0] + ">"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_origin(v, labels) for v in value) + "]"
    return repr(value)


def attn_summary(ep: torch.export.ExportedProgram) -> str:
    """The attn calls of ``ep`` in graph order, where each argument comes from, and the outputs.

    Inputs are named as in the graph signature (``b_layer_k_cache`` is a buffer); the caches
    written by a functionalized store are ``store_kvcache#i.k_cache``; anything computed by other
    ops is ``<op>``. The output lines show which graph value lands in which buffer.
    """
    labels, counts, lines = {}, {}, []
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target.__name__ == "getitem" \
                and node.args[0] in labels:
            labels[node] = labels[node.args[0]][node.args[1]]
            continue
        if node.op != "call_function" or (call := _attn_call(node)) is None:
            continue
        op, kwargs, functional = call
        name = op._schema.name.split("::")[1]
        label = f"{name}#{counts.setdefault(name, 0)}"
        counts[name] += 1
        args = ", ".join(f"{k}={_origin(v, labels)}" for k, v in kwargs.items())
        lines.append(f"{label}({args})" + ("  [functionalized]" if functional else ""))
        if functional:
            # auto_functionalized outputs end with the written tensors (v2 puts a None first
            # for an op that returns nothing).
            mutated = [a.name for a in op._schema.arguments
                       if a.alias_info is not None and a.alias_info.is_write]
            n_out = len(node.meta["val"]) - len(mutated)
            labels[node] = {n_out + i: f"{label}.{m}" for i, m in enumerate(mutated)}
    by_name = {n.name: n for n in ep.graph.nodes}
    for spec in ep.graph_signature.output_specs:
        if spec.kind.name == "USER_OUTPUT":
            lines.append("output USER_OUTPUT")
            continue
        src = _origin(by_name.get(spec.arg.name), labels)
        lines.append(f"output {spec.kind.name}: {spec.target} <- {src}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# A dense SDPA model for the substitution tests (graph_passes.substitute_attention)
# ---------------------------------------------------------------------------------------------

class SdpaBlock(torch.nn.Module):
    """x ``[B, S, 32]`` -> ``[B, S, 32]``: a causal SDPA (replaceable by ``attn.prefill``), then
    an SDPA with an arbitrary additive mask ``[S, S]`` (not provably equivalent: must stay)."""

    def __init__(self, hidden: int = 32, heads: int = 2, head_dim: int = 16):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = torch.nn.Linear(hidden, 3 * heads * head_dim, bias=False)
        self.out = torch.nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = F.scaled_dot_product_attention(a, k, v, attn_mask=mask)
        return self.out(a.transpose(1, 2).reshape(b, s, -1))


def sdpa_inputs(seq: int, batch: int = 2, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, seq, 32, generator=gen), torch.randn(seq, seq, generator=gen))


def sdpa_dynamic_shapes() -> dict:
    seq = torch.export.Dim("seq", min=2, max=512)
    return {"x": {1: seq}, "mask": {0: seq, 1: seq}}


def count_calls(ep_or_gm, target) -> int:
    graph = ep_or_gm.graph
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target is target)


def aoti_test_configs() -> dict:
    """Inductor options for the AOTInductor tests: compile the C++ *wrapper* at -O0 (kernels
    keep -O3). On a 2-core CPU a package of the example step took 24 s instead of 43 s cold."""
    if hasattr(torch._inductor.config.aot_inductor, "compile_wrapper_opt_level"):
        return {"aot_inductor.compile_wrapper_opt_level": "O0"}
    return {}


def compile_step_packages(layer: pam.PagedAttention, steps: list[Step], folder: Path) -> dict:
    """Export both steps of ``layer`` (dynamic shapes) and AOTInductor-compile each into
    ``folder``; returns {kind: package path}."""
    paths = {}
    for kind, module in steps_of(layer).items():
        ep = torch.export.export(module, example_step_args(steps, kind),
                                 dynamic_shapes=pam.dynamic_shapes(module))
        paths[kind] = torch._inductor.aoti_compile_and_package(
            ep, package_path=str(folder / f"{kind}.pt2"), inductor_configs=aoti_test_configs())
    return paths


def package_sources(path: str, suffix: str = ".wrapper.cpp") -> str:
    """The generated sources (AOTInductor C++ wrapper by default) stored in a .pt2 package."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        return "\n".join(zf.read(n).decode() for n in zf.namelist() if n.endswith(suffix))
