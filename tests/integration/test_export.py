"""torch.export of models that call the attn ops, and .pt2 save / load.

(a) The example layer (examples/paged_attention_model.py) with its paged caches as buffers:
    store + prefill and store + decode, exported with dynamic token count, batch and block-table
    width, strict and non-strict. The graph keeps the attn ops through run_decompositions(), the
    cache writes are buffer mutations of the signature, and one exported program serves a whole
    schedule of steps whose sizes all change (nothing frozen).
(b) A dense SDPA model after graph_passes.substitute_attention.
.pt2 files are loaded in a fresh process: with ``import attn_ops`` they reproduce the eager
results; without it torch refuses with its "not registered" message (quoted in docs/export.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from expecttest import assert_expected_inline

from tests.support.capture import (SdpaBlock, assert_schedule_matches, attn_summary, count_calls,
                             example_step_args, make_layer, pam, reference, run_schedule,
                             schedule, sdpa_dynamic_shapes, sdpa_inputs, steps_of,
                             substitution_pass)
from tests.support.helpers import TOLERANCES, assert_close

STORE = torch.ops.attn.store_kvcache.default
PREFILL = torch.ops.attn.prefill.default
DECODE = torch.ops.attn.decode.default
SDPA = torch.ops.aten.scaled_dot_product_attention.default
TOL = TOLERANCES[torch.float32]
__all__ = ["schedule", "reference"]  # module-scoped fixtures shared with the other test files

substitute_attention, _SUBST_MISSING = substitution_pass()
needs_substitution = pytest.mark.skipif(_SUBST_MISSING is not None,
                                        reason=_SUBST_MISSING or "")


def export_steps(schedule, strict: bool) -> tuple[dict, pam.PagedAttention]:
    """Export both steps of a layer bound to fresh copies of the schedule's initial caches."""
    steps, k0, v0 = schedule
    layer = make_layer(k0.clone(), v0.clone())
    eps = {}
    for kind, module in steps_of(layer).items():
        eps[kind] = torch.export.export(module, example_step_args(steps, kind),
                                        dynamic_shapes=pam.dynamic_shapes(module), strict=strict)
    return eps, layer


@pytest.fixture(scope="module", params=[False, True], ids=["nonstrict", "strict"])
def exported(request, schedule):
    return export_steps(schedule, strict=request.param)


# ---------------------------------------------------------------------------------------------
# (a) graphs
# ---------------------------------------------------------------------------------------------

def test_export_graph_calls_attn_ops_on_buffers(exported):
    eps, _ = exported
    assert_expected_inline(attn_summary(eps["decode"]), """\
store_kvcache#0(key=<view>, value=<view>, k_cache=b_layer_k_cache, v_cache=b_layer_v_cache, slot_mapping=slot_mapping, k_scale=None, v_scale=None)
decode#0(q=<view>, k_cache=b_layer_k_cache, v_cache=b_layer_v_cache, seqlens_k=seqlens_k, block_table=block_table, scale=0.25, window_left=-1, softcap=0.0, sinks=None, k_scale=None, v_scale=None)
output USER_OUTPUT""")


def test_run_decompositions_keeps_attn_ops_and_buffer_mutations(exported):
    """The ops are CompositeExplicitAutograd custom ops: decomposition leaves them whole; the
    store is functionalized, its results are the buffers' new values, and the attention reads
    those results (so nothing can reorder it before the store)."""
    eps, _ = exported
    decode = eps["decode"].run_decompositions()
    assert_expected_inline(attn_summary(decode), """\
store_kvcache#0(key=<view>, value=<view>, k_cache=b_layer_k_cache, v_cache=b_layer_v_cache, slot_mapping=slot_mapping, k_scale=None, v_scale=None)  [functionalized]
decode#0(q=<view>, k_cache=store_kvcache#0.k_cache, v_cache=store_kvcache#0.v_cache, seqlens_k=seqlens_k, block_table=block_table, scale=0.25, window_left=-1, softcap=0.0, sinks=None, k_scale=None, v_scale=None)
output BUFFER_MUTATION: layer.k_cache <- store_kvcache#0.k_cache
output BUFFER_MUTATION: layer.v_cache <- store_kvcache#0.v_cache
output USER_OUTPUT""")
    prefill = eps["prefill"].run_decompositions()
    assert_expected_inline(attn_summary(prefill), """\
store_kvcache#0(key=<view>, value=<view>, k_cache=b_layer_k_cache, v_cache=b_layer_v_cache, slot_mapping=slot_mapping, k_scale=None, v_scale=None)  [functionalized]
prefill#0(q=<view>, k=store_kvcache#0.k_cache, v=store_kvcache#0.v_cache, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=<sym_size>, max_seqlen_k=<mul>, scale=0.25, causal=True, block_table=block_table, window_left=-1, softcap=0.0, sinks=None, k_scale=None, v_scale=None)
output BUFFER_MUTATION: layer.k_cache <- store_kvcache#0.k_cache
output BUFFER_MUTATION: layer.v_cache <- store_kvcache#0.v_cache
output USER_OUTPUT""")
    assert set(prefill.graph_signature.buffers_to_mutate.values()) == {"layer.k_cache",
                                                                       "layer.v_cache"}


def test_token_count_batch_and_table_width_are_symbolic(exported):
    eps, _ = exported
    for kind, dims in (("prefill", {"x": [0], "block_table": [0, 1], "cu_seqlens_q": [0]}),
                       ("decode", {"x": [0], "block_table": [0, 1], "seqlens_k": [0]})):
        inputs = {n.name: n.meta["val"] for n in eps[kind].graph.nodes if n.op == "placeholder"}
        for name, axes in dims.items():
            for axis in axes:
                size = inputs[name].shape[axis]
                assert isinstance(size, torch.SymInt), f"{kind}: {name} dim {axis} is {size}"
    # The prefill's max_seqlen_q is the token count itself, not the example's 8.
    call = next(n for n in eps["prefill"].graph.nodes if n.target is PREFILL)
    assert isinstance(call.args[5].meta["val"], torch.SymInt)


# ---------------------------------------------------------------------------------------------
# (a) values
# ---------------------------------------------------------------------------------------------

def test_exported_program_serves_schedule_in_place(exported, schedule, reference):
    """One program per step kind runs every step (T 8 -> 9, B 2 -> 3 -> 1, width 6 -> 9) and
    writes the very cache tensors the layer was built with (ep.module() shares them)."""
    eps, layer = exported
    steps, _, _ = schedule
    k_cache, v_cache = layer.k_cache, layer.v_cache
    outs = run_schedule({kind: ep.module() for kind, ep in eps.items()}, steps)
    assert_schedule_matches(outs, k_cache, v_cache, reference, steps, TOL)
    # No copy anywhere: the program wrote the layer's own tensors, which it still holds.
    assert layer.k_cache is k_cache and eps["decode"].state_dict["layer.k_cache"] is k_cache


class CachesAsInputs(torch.nn.Module):
    """store + decode with the caches passed in (a server that owns them outside the model)."""

    def forward(self, q, k, v, k_cache, v_cache, slot_mapping, seqlens_k, block_table):
        torch.ops.attn.store_kvcache(k, v, k_cache, v_cache, slot_mapping)
        return torch.ops.attn.decode(q, k_cache, v_cache, seqlens_k, block_table, 0.25)


def test_caches_as_inputs_are_user_input_mutations(schedule):
    steps, k0, v0 = schedule
    _, slots, seqlens, table = example_step_args(steps, "decode")
    b = slots.shape[0]
    q, k, v = torch.randn(b, 4, 16), torch.randn(b, 2, 16), torch.randn(b, 2, 16)
    args = (q, k, v, k0.clone(), v0.clone(), slots, seqlens, table)
    batch = torch.export.Dim("batch", min=1, max=256)
    dyn = {"q": {0: batch}, "k": {0: batch}, "v": {0: batch}, "k_cache": None, "v_cache": None,
           "slot_mapping": {0: batch}, "seqlens_k": {0: batch}, "block_table": {0: batch}}
    ep = torch.export.export(CachesAsInputs(), args, dynamic_shapes=dyn).run_decompositions()
    assert set(ep.graph_signature.user_inputs_to_mutate.values()) == {"k_cache", "v_cache"}
    mine_k, mine_v = k0.clone(), v0.clone()
    out = ep.module()(q, k, v, mine_k, mine_v, slots, seqlens, table)
    eager_k, eager_v = k0.clone(), v0.clone()
    expected = CachesAsInputs()(q, k, v, eager_k, eager_v, slots, seqlens, table)
    assert_close(out, expected, *TOL)
    assert_close(mine_k, eager_k, *TOL, what="k_cache (caller's tensor)")
    assert_close(mine_v, eager_v, *TOL, what="v_cache (caller's tensor)")
    assert not torch.equal(mine_k, k0), "the store wrote nothing into the caller's k_cache"


def test_bad_shape_fails_at_export_time(schedule):
    """The fake kernels run the metadata checks: a 1-D block table is rejected while tracing."""
    steps, k0, v0 = schedule
    module = pam.DecodeStep(make_layer(k0.clone(), v0.clone()))
    x, slots, seqlens, table = example_step_args(steps, "decode")
    with pytest.raises(ValueError, match=r"block_table: expected a 2-D tensor"):
        torch.export.export(module, (x, slots, seqlens, table.flatten()))


# ---------------------------------------------------------------------------------------------
# .pt2 in a fresh process
# ---------------------------------------------------------------------------------------------

# Runs in a fresh interpreter: loads the .pt2 files named in a job file, binds its own copies of
# the caches into each loaded program (no copy: load_state_dict(assign=True)), runs the steps,
# and saves the outputs and those caches for the test to compare.
_RUNNER = textwrap.dedent("""
    import sys, torch
    import attn_ops  # registers torch.ops.attn.*: must precede torch.export.load
    job = torch.load(sys.argv[1])
    results = []
    for programs, caches, steps in job:
        mods = {kind: torch.export.load(path).module() for kind, path in programs.items()}
        for m in mods.values():
            if caches:
                m.load_state_dict(caches, strict=False, assign=True)
        with torch.no_grad():
            outs = [mods[kind](*args) for kind, args in steps]
        results.append((outs, caches))
    torch.save(results, sys.argv[2])
""")


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ATTN_OPS_CHECK="1")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def saved_programs(schedule, tmp_path_factory):
    """Both steps exported and saved right away (the .pt2 holds the initial caches), in the
    raw form torch.export returns and after run_decompositions()."""
    eps, _ = export_steps(schedule, strict=False)
    folder = tmp_path_factory.mktemp("pt2")
    saved = {}
    for form, programs in (("raw", eps),
                           ("decomposed", {k: e.run_decompositions() for k, e in eps.items()})):
        saved[form] = {}
        for kind, ep in programs.items():
            saved[form][kind] = str(folder / f"{kind}_{form}.pt2")
            torch.export.save(ep, saved[form][kind])
    return saved


def _run_fresh(jobs: list, folder) -> list:
    torch.save(jobs, folder / "job.pt")
    proc = _python(_RUNNER, str(folder / "job.pt"), str(folder / "out.pt"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(folder / "out.pt")


def test_pt2_roundtrip_in_fresh_process(schedule, reference, saved_programs, tmp_path):
    """Reloaded elsewhere, both forms give the eager results, and they write the caches the
    loader bound into them."""
    steps, k0, v0 = schedule
    forms = sorted(saved_programs)
    jobs = [(saved_programs[form], {"layer.k_cache": k0.clone(), "layer.v_cache": v0.clone()},
             [(s.kind, s.args) for s in steps]) for form in forms]
    for form, (outs, caches) in zip(forms, _run_fresh(jobs, tmp_path)):
        assert_schedule_matches(outs, caches["layer.k_cache"], caches["layer.v_cache"],
                                reference, steps, TOL, what=f"{form}: ")


def test_pt2_load_without_import_names_the_missing_op(saved_programs):
    proc = _python("import sys, torch; torch.export.load(sys.argv[1])",
                   saved_programs["raw"]["decode"])
    assert proc.returncode != 0
    # torch 2.13's wording; docs/export.md quotes it in full.
    assert "We failed to resolve torch.ops.attn.store_kvcache.default to an operator" \
        in proc.stderr, proc.stderr[-4000:]
    assert "Please import the custom op to register it before deserializing" in proc.stderr
    assert "We ran into an error when deserializing the saved file" in proc.stderr


# ---------------------------------------------------------------------------------------------
# (b) an SDPA model after the substitution pass
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdpa_exported():
    model = SdpaBlock().eval()
    ep = torch.export.export(model, sdpa_inputs(9), dynamic_shapes=sdpa_dynamic_shapes())
    return model, ep


@needs_substitution
def test_sdpa_substitution_replaces_only_the_causal_call(sdpa_exported):
    model, ep = sdpa_exported
    assert count_calls(ep, SDPA) == 2
    new = substitute_attention(ep)
    assert isinstance(new, torch.export.ExportedProgram)
    assert count_calls(new, PREFILL) == 1, new.graph
    assert count_calls(new, SDPA) == 1, "the masked SDPA is not provably equivalent: keep it"
    with torch.no_grad():
        for seq in (9, 13, 2):  # the example's length, then others: the length is a Dim
            inputs = sdpa_inputs(seq, seed=seq)
            assert_close(new.module()(*inputs), model(*inputs), *TOL, what=f"seq {seq}")


@needs_substitution
def test_sdpa_substituted_run_decompositions(sdpa_exported):
    _, ep = sdpa_exported
    new = substitute_attention(ep)
    table = torch.export.default_decompositions()
    del table[SDPA]  # "keep SDPA": the remaining call must not become math
    kept = new.run_decompositions(table)
    assert count_calls(kept, PREFILL) == 1 and count_calls(kept, SDPA) == 1
    # With torch's default table the attn op still survives (the unreplaced SDPA becomes math).
    assert count_calls(new.run_decompositions(), PREFILL) == 1


@needs_substitution
def test_sdpa_substituted_pt2_roundtrip_in_fresh_process(sdpa_exported, tmp_path):
    model, ep = sdpa_exported
    path = str(tmp_path / "sdpa.pt2")
    torch.export.save(substitute_attention(ep), path)
    inputs = sdpa_inputs(13, seed=3)
    [(outs, _)] = _run_fresh([({"sdpa": path}, None, [("sdpa", inputs)])], tmp_path)
    with torch.no_grad():
        assert_close(outs[0], model(*inputs), *TOL, what="reloaded substituted SDPA model")


# ---------------------------------------------------------------------------------------------
# The user-facing example, run as a user runs it
# ---------------------------------------------------------------------------------------------

def test_export_example_runs_and_checks_itself(tmp_path):
    """examples/export_model.py: export, save, load, AOTInductor, serve; it checks every step
    against eager itself and reports what it checked."""
    import json
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "export_model.py"
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(example), "--device", "cpu", "--out",
                           str(tmp_path / "out"), "--json", str(report)], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, ATTN_OPS_CHECK="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(report.read_text())
    assert r["ok"] and r["max_err"] <= r["tol"] == 1e-4
    assert set(r["checks"]) == {"prefill", *(f"decode {i}" for i in range(5)), "k_cache",
                                "v_cache"}
    assert r["lengths"] == {"a": 12, "b": 9}
    assert r["files"] == ["decode.pt2", "decode_aoti.pt2", "prefill.pt2"]
    for kind, op in (("prefill", "attn.prefill.default"), ("decode", "attn.decode.default")):
        info = r["programs"][kind]
        assert info["attn_ops"] == sorted([op, "attn.store_kvcache.default"])
        assert info["buffer_mutations"] == ["layer.k_cache", "layer.v_cache"]
        assert info["dynamic_dims"]["x"] == [0] and info["dynamic_dims"]["block_table"] == [0, 1]
