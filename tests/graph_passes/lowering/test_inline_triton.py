"""inline_triton: attn ops that Triton serves become triton_ops Inductor compiles, and the
compile backend guards its artifacts on the attn backend choice.

On the CPU, Inductor cannot compile user Triton kernels (the interpreter runs only eagerly), so
the rewrite is checked on captured graphs (lowering forced onto the CPU) and run eagerly; the
guard is checked with the CPU artifacts, whose attn ops stay extern calls. Marked ``cuda``: the
whole path, with Inductor's generated code launching our kernels.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import attn_ops
import graph_passes
from attn_ops import registry
from attn_ops.backends import reference
from graph_passes.lowering.inline_triton import InlineTritonPass
from tests.support.helpers import TOLERANCES, assert_close, cu_seqlens, random_paged

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_compile")


def _decode_args(device="cpu", dtype=torch.float32):
    torch.manual_seed(3)
    pb = random_paged([5, 12, 1], 2, 32, 4, dtype, device=device)
    q = torch.randn(3, 4, 32, dtype=dtype, device=device)
    seqlens = torch.tensor([5, 12, 1], dtype=torch.int32, device=device)
    return q, pb.k_cache, pb.v_cache, seqlens, pb.block_table


def _two_decodes(q, k_cache, v_cache, seqlens, table):
    a = torch.ops.attn.decode(q, k_cache, v_cache, seqlens, table, 0.3)
    return torch.ops.attn.decode(a * 2, k_cache, v_cache, seqlens, table, 0.3, -1, 0.0)


def _captured(fn, args):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch.compile(fn, backend=capture, fullgraph=True)(*args)
    (gm,) = graphs
    return gm


@pytest.mark.parametrize("choice,inlined", [("triton", 2), ("reference", 0), ("auto", 0)])
def test_calls_triton_serves_become_triton_ops(choice, inlined, monkeypatch):
    monkeypatch.setenv("ATTN_OPS_CHECK", "0")
    args = _decode_args()
    gm = _captured(_two_decodes, args)
    assert InlineTritonPass(choice=choice, devices=("cpu",)).run(gm.graph) == inlined
    gm.recompile()
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert sum("attn_triton.decode" in t for t in targets) == inlined
    # The rewritten graph runs (eagerly: the triton_op's own kernel, the interpreter here).
    assert_close(gm(*args)[0] if isinstance(gm(*args), tuple) else gm(*args),
                 _reference_two_decodes(*args), *TOLERANCES[torch.float32])


def _reference_two_decodes(q, k_cache, v_cache, seqlens, table):
    a = reference.decode(q, k_cache, v_cache, seqlens, table, 0.3)
    return reference.decode(a * 2, k_cache, v_cache, seqlens, table, 0.3)


@pytest.mark.parametrize("why", ["check", "device", "sinks"])
def test_calls_left_alone(why, monkeypatch):
    monkeypatch.setenv("ATTN_OPS_CHECK", "1" if why == "check" else "0")
    args = _decode_args()
    fn = _two_decodes
    if why == "sinks":
        sinks = torch.randn(4)
        fn = lambda *a: torch.ops.attn.decode(*a, 0.3, -1, 0.0, sinks)  # noqa: E731
    gm = _captured(fn, args)
    devices = ("cuda",) if why == "device" else ("cpu",)
    counters.clear()
    assert InlineTritonPass(choice="triton", devices=devices).run(gm.graph) == 0
    assert counters["inline_triton_kept_extern"]["decode"] >= 1
    assert not counters["inline_triton"]  # nothing counted as inlined


def test_compiled_graph_is_guarded_on_the_choice(monkeypatch):
    """One artifact per attn backend choice, compiled when the choice is first seen; Dynamo
    itself does not recompile, and each artifact runs on its choice."""
    import torch._inductor.compile_fx as cfx
    monkeypatch.setenv("ATTN_OPS_CHECK", "0")
    monkeypatch.delenv("ATTN_OPS_BACKEND", raising=False)
    compiles = []
    real = cfx.compile_fx

    depth = []

    def counting(gm, inputs, **kw):  # compile_fx calls itself: count the outermost calls
        if not depth:
            compiles.append(registry.current_choice())
        depth.append(1)
        try:
            return real(gm, inputs, **kw)
        finally:
            depth.pop()
    monkeypatch.setattr(cfx, "compile_fx", counting)
    seen = []
    real_decode = reference.decode
    monkeypatch.setattr(reference, "decode",
                        lambda *a, **k: (seen.append(registry.current_choice()),
                                         real_decode(*a, **k))[1])
    registry.clear_cache()
    args = _decode_args()
    fn = torch.compile(_two_decodes, backend="attn_ops")
    want = _reference_two_decodes(*args)
    seen.clear()
    with torch.no_grad():
        for choice in ("reference", "sdpa", "reference", "sdpa", "reference"):
            with attn_ops.use_backend(choice):
                assert_close(fn(*args), want, *TOLERANCES[torch.float32])
    assert compiles == ["reference", "sdpa"]
    assert seen == ["reference"] * 6  # sdpa's decode is its own, not the reference's
    assert counters["stats"]["unique_graphs"] == 1
    registry.clear_cache()


@pytest.mark.cuda
def test_inductor_launches_our_kernels_and_recompiles_per_choice(monkeypatch):
    from torch._inductor.utils import run_and_get_code
    monkeypatch.setenv("ATTN_OPS_CHECK", "0")
    args = _decode_args("cuda", torch.bfloat16)
    want = _reference_two_decodes(*args)
    fn = torch.compile(_two_decodes, backend=graph_passes.attn_ops_backend)
    with torch.no_grad():
        with attn_ops.use_backend("triton"):
            out, code = run_and_get_code(fn, *args)
            assert_close(out, want, *TOLERANCES[torch.bfloat16])
            source = "\n".join(code)
            assert "_decode_split_kernel" in source and "attn.decode" not in source
            assert_close(fn(*args), want, *TOLERANCES[torch.bfloat16])
        with attn_ops.use_backend("reference"):
            assert_close(fn(*args), want, *TOLERANCES[torch.bfloat16])
    assert counters["inline_triton"]["decode"] == 2



@pytest.mark.cuda
def test_inductor_launches_the_balanced_decode_kernel(monkeypatch):
    """The balanced decode kernel (a loop over pieces, a merge by counter) from Inductor's
    generated code: its plan forced here (on the GPU it is the WIDE and DEEP rows' default)."""
    from torch._inductor.utils import run_and_get_code
    from attn_ops.backends.triton import decode_kernel
    monkeypatch.setenv("ATTN_OPS_CHECK", "0")
    monkeypatch.setattr(decode_kernel, "balanced_default", lambda config, splits: True)
    decode_kernel._plan.cache_clear()
    try:
        args = _decode_args("cuda", torch.bfloat16)
        want = _reference_two_decodes(*args)
        fn = torch.compile(_two_decodes, backend=graph_passes.attn_ops_backend)
        with torch.no_grad(), attn_ops.use_backend("triton"):
            out, code = run_and_get_code(fn, *args)
            assert_close(out, want, *TOLERANCES[torch.bfloat16])
            assert "decode_balanced_kernel" in "\n".join(code)
            assert_close(fn(*args), want, *TOLERANCES[torch.bfloat16])
    finally:
        decode_kernel._plan.cache_clear()


@pytest.mark.parametrize("route", ["unified", "prefill"])
def test_the_prefill_triton_op_takes_the_backends_route(route, monkeypatch):
    """attn_triton.prefill runs the kernel the Triton backend's route picks for the call (few
    queries per sequence over a paged cache: the unified kernel; long prompts: the FA2-style
    one), eagerly here (the interpreter)."""
    from attn_ops.backends import triton as tb
    from attn_ops.backends.triton import prefill_kernel, triton_ops, unified_kernel  # noqa: F401
    calls, routed = [], []
    real_route = tb.prefill_route
    monkeypatch.setattr(tb, "prefill_route", lambda *a, **k: (
        routed.append(real_route(*a, **k)), route)[1])
    for module in (unified_kernel, prefill_kernel):
        real = module.prefill
        monkeypatch.setattr(module, "prefill", lambda *a, real=real, module=module, **k: (
            calls.append(module.__name__.rsplit(".", 1)[1]), real(*a, **k))[1])
    torch.manual_seed(0)
    pb = random_paged([13, 40, 3], 2, 32, 16, torch.float16)
    q = torch.randn(7, 4, 32, dtype=torch.float16)
    args = (q, pb.k_cache, pb.v_cache, cu_seqlens([2, 4, 1]), cu_seqlens([13, 40, 3]), 4, 40,
            0.2, True, pb.block_table)
    assert_close(torch.ops.attn_triton.prefill(*args), reference.prefill(*args),
                 *TOLERANCES[torch.float16])
    assert routed == ["unified"]  # what the backend's route says for this call
    assert calls == [route + "_kernel"]


@pytest.mark.cuda
def test_inductor_launches_the_few_query_balanced_kernel(monkeypatch):
    """A few queries per sequence over a paged cache, B 16 x 8 kv heads (the WIDE row): the
    plan's balanced kernel, launched from Inductor's generated code."""
    from torch._inductor.utils import run_and_get_code
    monkeypatch.setenv("ATTN_OPS_CHECK", "0")
    torch.manual_seed(0)
    lens_q, lens_k = [4, 1, 2, 3] * 4, [3000, 17, 2, 700] * 4
    pb = random_paged(lens_k, 8, 128, 16, torch.bfloat16, device="cuda")
    q = torch.randn(sum(lens_q), 32, 128, dtype=torch.bfloat16, device="cuda")
    args = (q, pb.k_cache, pb.v_cache, cu_seqlens(lens_q, "cuda"), cu_seqlens(lens_k, "cuda"),
            pb.block_table)

    def fn(q, k, v, cu_q, cu_k, table):
        return torch.ops.attn.prefill(q, k, v, cu_q, cu_k, 4, 3000, 128 ** -0.5, True, table)
    want = reference.prefill(*args[:5], 4, 3000, 128 ** -0.5, True, args[5])
    compiled = torch.compile(fn, backend=graph_passes.attn_ops_backend)
    with torch.no_grad(), attn_ops.use_backend("triton"):
        out, code = run_and_get_code(compiled, *args)
    assert_close(out, want, *TOLERANCES[torch.bfloat16])
    assert "decode_balanced_kernel" in "\n".join(code)


def test_a_graph_inductor_cannot_compile_falls_back_to_extern_calls(monkeypatch, caplog):
    """Lowering forced onto the CPU, where Inductor cannot compile the (interpreted) Triton
    kernels: the compile falls back to the attn ops as extern calls and computes the same."""
    import functools

    import graph_passes.compile_backend as cb
    monkeypatch.setenv("ATTN_OPS_CHECK", "0")
    monkeypatch.setattr(cb, "InlineTritonPass",
                        functools.partial(InlineTritonPass, devices=("cpu",)))
    args = _decode_args()
    want = _reference_two_decodes(*args)
    fn = torch.compile(_two_decodes, backend=graph_passes.attn_ops_backend)
    with torch.no_grad(), attn_ops.use_backend("triton"):
        assert_close(fn(*args), want, *TOLERANCES[torch.float32])
    assert counters["inline_triton"]["decode"] == 2
    assert "inlining the Triton kernels failed" in caplog.text


def test_inlining_compiles_float_arguments_as_triton_does():
    """Triton's JIT passes Python floats to our kernels as fp32; Inductor's default (fp64) made
    the decode kernel's accumulator fp64 and its tl.dot fail to compile on the H200."""
    from graph_passes.compile_backend import pass_config_patches
    from graph_passes.options import SubstitutionOptions
    if not hasattr(torch._inductor.config, "_use_fp64_for_unbacked_floats"):
        pytest.skip("this torch has no such Inductor option")
    assert pass_config_patches(SubstitutionOptions(), "triton")[
        "_use_fp64_for_unbacked_floats"] is False
    assert "_use_fp64_for_unbacked_floats" not in pass_config_patches(SubstitutionOptions())
    assert "_use_fp64_for_unbacked_floats" not in pass_config_patches(
        SubstitutionOptions(inline_triton=False), "triton")


def test_prefill_the_backend_routes_to_the_hopper_kernel_stays_an_extern_call(monkeypatch):
    # Inductor cannot launch the Gluon kernel inline: such prefills keep the attn op (which
    # routes them there at run time); the others still become triton_ops
    from attn_ops.backends import triton as tb
    monkeypatch.setenv("ATTN_OPS_CHECK", "0")
    torch.manual_seed(0)
    q = torch.randn(20, 4, 32)
    k, v = torch.randn(20, 2, 32), torch.randn(20, 2, 32)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)

    def fn(q, k, v, cu):
        return torch.ops.attn.prefill(q, k, v, cu, cu, 13, 13, 0.2, True)
    for route, inlined in (("hopper", 0), ("prefill", 1)):
        monkeypatch.setattr(tb, "prefill_route", lambda *a, route=route, **kw: route)
        gm = _captured(fn, (q, k, v, cu))
        assert InlineTritonPass(choice="triton", devices=("cpu",)).run(gm.graph) == inlined
