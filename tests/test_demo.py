"""The demo: paged serving equals the full model, continuous batching, the CLI and its errors."""

import io
import json
import subprocess
import sys

import pytest
import torch
from tqdm import tqdm

from attn_ops import registry
from attn_ops.demo import job
from attn_ops.demo.__main__ import main
from attn_ops.demo.compile_check import compile_and_check
from attn_ops.demo.model import DemoConfig, DemoLlama
from attn_ops.demo.serving import Request, check_against_eager, serve
from tests.support.helpers import assert_close

SMALL = DemoConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=96)


@pytest.fixture(scope="module")
def model():
    return DemoLlama(SMALL, seed=3).eval()


@torch.inference_mode()
def test_paged_forward_matches_full_forward(model):
    """Packed prefill (odd lengths), a prefix-cached second chunk, padded decode steps."""
    ids = torch.randint(0, SMALL.vocab_size, (2, 23))
    full = model(ids)                                             # [2, 23, vocab]
    cache = model.new_cache(num_blocks=16, block_size=4, max_seq_len=32)
    batch = cache.prepare_prefill({"a": 13, "b": 1})
    out = model.prefill(torch.cat([ids[0, :13], ids[1, :1]]), cache, batch)
    assert_close(out, torch.stack([full[0, 12], full[1, 0]]), 1e-4, 1e-4, "prefill")
    batch = cache.prepare_prefill({"b": 6})                       # continues b: 1 cached + 6
    assert_close(model.prefill(ids[1, 1:7], cache, batch)[0], full[1, 6], 1e-4, 1e-4, "chunk")
    for pos_a, pos_b in [(13, 7), (14, 8), (15, 9)]:
        step = cache.prepare_decode(["b", "a"], pad_to=5)         # rows 2..4 are padding
        tokens = torch.tensor([ids[1, pos_b], ids[0, pos_a], 0, 0, 0])
        out = model.decode(tokens, cache, step)
        assert not torch.isnan(out).any()
        assert_close(out[:2], torch.stack([full[1, pos_b], full[0, pos_a]]), 1e-4, 1e-4,
                     f"decode at {pos_a}")


def _requests(lens, new):
    gen = torch.Generator().manual_seed(7)
    return [Request(f"r{i}", torch.randint(0, SMALL.vocab_size, (n,), generator=gen).tolist(), m)
            for i, (n, m) in enumerate(zip(lens, new))]


@torch.inference_mode()
def test_continuous_batching_serves_eager_tokens(model):
    reqs = _requests([5, 11, 3, 8, 13], [6, 2, 5, 1, 4])
    cache = model.new_cache(num_blocks=8, block_size=4, max_seq_len=24)
    stats = serve(model, reqs, cache, max_batch=3)
    assert [len(r.output) for r in reqs] == [6, 2, 5, 1, 4]
    assert stats.generated == 18 and stats.max_running == 3
    assert stats.decode_padded_rows > 0                    # the tail ran with padded rows
    assert len({r.finished_at for r in reqs}) > 2          # finished at different steps
    assert max(r.admitted_at for r in reqs) > 0            # later requests joined mid-way
    assert cache.num_free_blocks == 8                      # every block came back
    check = check_against_eager(model, reqs, logit_tol=1e-3)
    assert check.ok and check.tokens_checked == 18 and check.max_logit_err < 1e-3


@torch.inference_mode()
def test_admission_waits_for_cache_blocks(model):
    """Blocks needed to the end: 3 + 3 + 2 + 2 + 4 of 7; the third request must wait."""
    reqs = _requests([5, 11, 3, 8, 13], [6, 2, 5, 1, 4])
    cache = model.new_cache(num_blocks=7, block_size=4, max_seq_len=24)
    stats = serve(model, reqs, cache, max_batch=4)
    assert stats.max_running == 2
    assert reqs[2].admitted_at > 0 and cache.num_free_blocks == 7
    assert check_against_eager(model, reqs, logit_tol=1e-3).ok


@torch.inference_mode()
def test_check_against_eager_catches_a_wrong_token(model):
    reqs = _requests([6], [4])
    serve(model, reqs, model.new_cache(4, 4, 16), max_batch=2)
    reqs[0].output[-1] = (reqs[0].output[-1] + 1) % SMALL.vocab_size  # never fed back
    assert check_against_eager(model, reqs, logit_tol=1e-3).mismatches == 1


def test_serve_rejects_a_request_larger_than_the_cache(model):
    with pytest.raises(ValueError, match="needs 5 blocks"):
        serve(model, _requests([17], [2]), model.new_cache(4, 4, 32), max_batch=2)


def test_demo_main_job(tmp_path):
    """The README's main command, in-process with few steps: compile, substitute, serve, check."""
    path = tmp_path / "report.json"
    assert main(["--steps", "5", "--no-progress", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["ok"]
    c = report["compile"]
    assert c["prefill_calls"] == c["expected"] == 2 and c["sdpa_calls"] == 0
    assert c["max_err"] <= report["logit_tol"]
    if not c["cache_hit"]:  # the passes ran (a warm compile cache skips them)
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


def test_unavailable_backend_is_a_clear_error():
    with pytest.raises(job.DemoError, match="'flash' cannot run prefill on cpu"):
        with registry.use_backend("flash"):
            job.planned_backends(SMALL, torch.device("cpu"), torch.float32, 8)
    assert main(["--backend", "npu", "--no-compile", "--no-progress"]) == 2


@torch.inference_mode()
def test_serve_advances_the_progress_bar_per_generated_token(model):
    reqs = _requests([4, 9], [3, 2])
    bar = tqdm(total=5, file=io.StringIO())
    stats = serve(model, reqs, model.new_cache(6, 4, 16), max_batch=2, progress=bar)
    assert bar.n == stats.generated == 5
    bar.close()


def test_import_attn_ops_does_not_import_the_demo():
    code = ("import sys, attn_ops; "
            "assert not [m for m in sys.modules if m.startswith('attn_ops.demo')], 'demo'")
    subprocess.run([sys.executable, "-c", code], check=True)


class CausalSdpa(torch.nn.Module):
    """Nothing but one causal SDPA call: the cheapest model to compile."""

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@torch.inference_mode()
def test_compile_check_fails_without_substitution():
    """With the SDPA pass off, the compiled code keeps SDPA: the check must say so."""
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    result = compile_and_check(CausalSdpa(), (q, k, v), expected=1, tol=1e-5,
                               options={"attn_ops.sdpa": False})
    assert result["prefill_calls"] == 0 and result["sdpa_calls"] == 1
    assert result["max_err"] <= 1e-5 and not result["ok"]


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
