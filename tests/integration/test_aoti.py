"""AOTInductor on CPU: packages of the exported example steps (and of the substituted SDPA
model) are compiled once per module, loaded, bound to the server's caches and run.

The packages call the attn ops through AOTInductor's proxy executor, i.e. through the
dispatcher, so the process that loads them must ``import attn_ops`` first; without it loading
fails with "Could not find schema for attn::store_kvcache." (quoted in docs/export.md).
CUDA packages are tested in test_cuda_graphs.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.support.capture import (SdpaBlock, aoti_test_configs, assert_schedule_matches, cache_copies,
                             compile_step_packages, make_layer, package_sources, pam, reference,
                             run_schedule, schedule, sdpa_dynamic_shapes, sdpa_inputs,
                             substitution_pass)
from tests.support.helpers import TOLERANCES, assert_close

TOL = TOLERANCES[torch.float32]
substitute_attention, _SUBST_MISSING = substitution_pass()
__all__ = ["schedule", "reference"]  # module-scoped fixtures shared with the other test files


@pytest.fixture(scope="module")
def packages(schedule, tmp_path_factory):
    """{kind: package path} for the prefill and decode steps (about 15-25 s each, 2 cores)."""
    steps, k0, v0 = schedule
    return compile_step_packages(make_layer(k0.clone(), v0.clone()), steps,
                                 tmp_path_factory.mktemp("aoti"))


def test_packages_serve_schedule_writing_bound_caches(packages, schedule, reference):
    """Both packages bound to the same two tensors: every step (sizes changing each time)
    matches eager, and the writes land in those tensors (shared by prefill and decode)."""
    steps, k0, v0 = schedule
    k_cache, v_cache = k0.clone(), v0.clone()
    runners = {}
    for kind, path in packages.items():
        runners[kind] = torch._inductor.aoti_load_package(path)
        pam.bind_aoti_caches(runners[kind], k_cache, v_cache)
    outs = run_schedule(runners, steps)
    assert_schedule_matches(outs, k_cache, v_cache, reference, steps, TOL, what="bound: ")


def test_package_wrappers_pass_the_caches_without_copy(packages, schedule):
    _, k0, _ = schedule
    for kind, path in packages.items():
        code = package_sources(path)
        assert "attn::store_kvcache" in code or "proxy_executor_call_function" in code, kind
        found = cache_copies(code, k0.numel())
        assert not found, f"{kind} package copies a cache:\n" + "\n".join(found)
        # The store's proxy call receives the cache constants themselves.
        calls = [line for line in code.splitlines() if "proxy_executor_call_function" in line]
        assert any("layer_k_cache" in c and "layer_v_cache" in c for c in calls), calls


# Fresh interpreter: first load without importing attn_ops (must fail, message recorded), then
# import it, load both packages, bind its own caches, run the steps, save everything.
_RUNNER = textwrap.dedent("""
    import sys, torch
    job = torch.load(sys.argv[1])
    try:
        torch._inductor.aoti_load_package(job["paths"]["decode"])
        error = None
    except RuntimeError as e:
        error = str(e)
    import attn_ops  # registers torch.ops.attn.*, which the packages call
    sys.path.insert(0, job["examples"])
    import paged_attention_model as pam
    k_cache, v_cache = job["caches"]
    runners = {}
    for kind, path in job["paths"].items():
        runners[kind] = torch._inductor.aoti_load_package(path)
        pam.bind_aoti_caches(runners[kind], k_cache, v_cache)
    outs = [runners[kind](*args) for kind, args in job["steps"]]
    torch.save({"error": error, "outs": outs, "caches": (k_cache, v_cache)}, sys.argv[2])
""")


def test_packages_load_in_fresh_process_only_after_import(packages, schedule, reference,
                                                          tmp_path):
    steps, k0, v0 = schedule
    job = {"paths": packages, "examples": str(pam.__file__).rsplit(os.sep, 1)[0],
           "caches": (k0.clone(), v0.clone()), "steps": [(s.kind, s.args) for s in steps]}
    torch.save(job, tmp_path / "job.pt")
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(tmp_path / "job.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(tmp_path / "out.pt")
    assert result["error"] is not None and \
        "Could not find schema for attn::store_kvcache" in result["error"], result["error"]
    assert_schedule_matches(result["outs"], *result["caches"], reference, steps, TOL,
                            what="fresh process: ")


@pytest.mark.skipif(_SUBST_MISSING is not None, reason=_SUBST_MISSING or "")
def test_substituted_sdpa_model_package(tmp_path):
    model = SdpaBlock().eval()
    ep = torch.export.export(model, sdpa_inputs(9), dynamic_shapes=sdpa_dynamic_shapes())
    path = torch._inductor.aoti_compile_and_package(
        substitute_attention(ep), package_path=str(tmp_path / "sdpa.pt2"),
        inductor_configs=aoti_test_configs())
    assert "attn::prefill" in package_sources(path, ".json") or \
        "attn::prefill" in package_sources(path)
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        for seq in (9, 13):
            inputs = sdpa_inputs(seq, seed=seq)
            assert_close(runner(*inputs), model(*inputs), *TOL, what=f"seq {seq}")
