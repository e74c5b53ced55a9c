"""The demo's job through its command line: compile, substitute, serve, check; clear errors."""

import json
import subprocess
import sys

import pytest
import torch
import torch._functorch.config
import torch._inductor.config

from attn_ops import registry
from attn_ops.demo import job
from attn_ops.demo.__main__ import main


def test_demo_main_job(tmp_path):
    """The README's main command, in-process with few steps: compile, substitute, serve, check.

    The AOTAutograd and FX graph caches are off for this compile: a warm cache serves the
    compiled graph without running the graph passes, and their counters would stay empty.
    """
    path = tmp_path / "report.json"
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        assert main(["--steps", "5", "--no-progress", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["ok"]
    c = report["compile"]
    assert c["prefill_calls"] == c["expected"] == 2 and c["sdpa_calls"] == 0
    assert c["max_err"] <= report["logit_tol"]
    assert not c["cache_hit"]  # so the passes ran and counted
    assert c["substitutions"] == {"sdpa_to_prefill": 2} and c["left_alone"] == {}
    assert set(report["backends"].values()) == {"sdpa"}  # "auto" on a CPU
    reqs = report["serving"]["requests"]
    assert [r["new_tokens"] for r in reqs] == [5, 1, 2, 4, 2, 5]
    assert report["check"]["tokens_checked"] == 19 and report["check"]["mismatches"] == 0
    assert len({r["finished_at"] for r in reqs}) > 2 and max(r["admitted_at"] for r in reqs) > 0
    assert report["serving"]["stats"]["decode_padded_rows"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_clear_error():
    with pytest.raises(job.DemoError, match="'cuda' is not available"):
        job.resolve_device("cuda")
    assert main(["--device", "cuda", "--no-progress"]) == 2


def test_unavailable_backend_is_a_clear_error(model):
    with pytest.raises(job.DemoError, match="'flash' cannot run prefill on cpu"):
        with registry.use_backend("flash"):
            job.planned_backends(model.cfg, torch.device("cpu"), torch.float32, 8)
    assert main(["--backend", "npu", "--no-compile", "--no-progress"]) == 2


def test_import_attn_ops_does_not_import_the_demo():
    code = ("import sys, attn_ops; "
            "assert not [m for m in sys.modules if m.startswith('attn_ops.demo')], 'demo'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "triton", "reference"])
def test_demo_main_job_on_gpu(tmp_path, backend):
    path = tmp_path / "report.json"
    assert main(["--device", "cuda", "--backend", backend, "--steps", "12",
                 "--no-progress", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["dtype"] == "bfloat16" and report["compile"]["prefill_calls"] == 2
    if backend != "auto":
        assert set(report["backends"].values()) == {backend}
