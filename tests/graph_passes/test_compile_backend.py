"""torch.compile(model, backend="attn_ops") with real Inductor: options, caches, and Hugging Face
Llama substituted in every layer."""

import importlib.metadata

import pytest
import torch
from torch._dynamo.utils import counters

import attn_ops  # noqa: F401  (registers torch.ops.attn.*)
import graph_passes
from graph_passes.testing import inspecting_backend
from tests.support.attention_models import HandAttention, SdpaAttention
from tests.support.helpers import TOLERANCES, assert_close

pytestmark = pytest.mark.usefixtures("fresh_compile")
TOL = TOLERANCES[torch.float32]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """CPU has only the reference backend, which "auto" does not substitute for (slower than
    what it replaces); these tests choose it explicitly, as a user would to force it."""
    monkeypatch.setenv("ATTN_OPS_BACKEND", "reference")


class Both(torch.nn.Module):
    """One SDPA call and one hand-written attention: both passes in one graph."""

    def __init__(self):
        super().__init__()
        self.sdpa = SdpaAttention(gqa="repeat_kv")
        self.hand = HandAttention(style="hf")

    def forward(self, x):
        return self.sdpa(x) + self.hand(x)


def test_registered_through_the_entry_point():
    (ep,) = [e for e in importlib.metadata.entry_points(group="torch_dynamo_backends")
             if e.name == "attn_ops"]
    assert ep.load() is graph_passes.attn_ops_backend
    assert "attn_ops" in torch._dynamo.list_backends()


def test_fullgraph_dynamic_no_recompile_across_five_shapes(prefill_calls):
    model = Both().eval()
    compiled = torch.compile(model, backend="attn_ops", fullgraph=True, dynamic=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for b, s in ((2, 5), (3, 13), (4, 2), (5, 33), (2, 8)):
            x = torch.randn(b, s, 64)
            assert_close(compiled(x), model(x), *TOL, what=f"{b}x{s}")
    assert counters["graph_passes"]["sdpa_to_prefill"] == 1
    assert counters["graph_passes"]["handwritten_to_prefill"] == 1
    assert not counters["graph_break"]
    assert len(prefill_calls) == 5 * 2


def test_options_choose_the_attn_backend(prefill_calls, monkeypatch):
    monkeypatch.delenv("ATTN_OPS_BACKEND")  # the option alone decides (and the run-time choice)
    model = SdpaAttention().eval()
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        out = torch.compile(model, backend="attn_ops",
                            options={"attn_ops.attn_backend": "reference"})(x)
        assert_close(out, model(x), *TOL)
    assert prefill_calls == ["reference"], "the compiled callable runs under use_backend"


def test_fx_graph_cache_keeps_substituted_and_plain_artifacts_apart(prefill_calls):
    model = SdpaAttention().eval()
    x = torch.randn(2, 7, 64)
    from torch._inductor.utils import fresh_cache
    with fresh_cache(), torch._inductor.config.patch(fx_graph_cache=True), torch.no_grad():
        ref = model(x)
        for backend, expect in (("inductor", 0), ("attn_ops", 1), ("inductor", 0),
                                ("attn_ops", 1)):
            torch._dynamo.reset()
            prefill_calls.clear()
            out = torch.compile(model, backend=backend)(x)
            assert len(prefill_calls) == expect, backend
            assert_close(out, ref, *TOL, what=backend)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 2, "the second round came from cache"


def _tiny_llama(impl: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                      max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = impl
    return model


def test_hf_llama_sdpa_every_layer_with_inductor():
    pytest.importorskip("transformers")
    model = _tiny_llama("sdpa")
    ids = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        out = torch.compile(model, backend="attn_ops", fullgraph=True)(ids).logits
        assert_close(out, model(ids).logits, *TOL)
    assert counters["graph_passes"]["sdpa_to_prefill"] == 2


@pytest.mark.parametrize("impl,kwargs,expect", [
    ("eager", dict(use_cache=False), ("handwritten_to_prefill", 2)),
    ("sdpa", dict(use_cache=False), ("sdpa_to_prefill", 2)),
    ("sdpa", dict(attention_mask="ones"), ("sdpa_to_prefill_left_alone", 2)),
])
def test_hf_llama_call_forms(impl, kwargs, expect):
    pytest.importorskip("transformers")
    model = _tiny_llama(impl)
    ids = torch.randint(0, 128, (2, 11))
    if kwargs.get("attention_mask") == "ones":
        kwargs = dict(attention_mask=torch.ones(2, 11, dtype=torch.long))
    with torch.no_grad():
        out = torch.compile(model, backend=inspecting_backend(), fullgraph=True)(ids, **kwargs)
        assert_close(out.logits, model(ids, **kwargs).logits, *TOL)
    name, count = expect
    assert counters["graph_passes"][name] == count


@pytest.mark.cuda
def test_cuda_auto_substitutes_with_a_fast_backend(monkeypatch):
    monkeypatch.delenv("ATTN_OPS_BACKEND")  # "auto": a Triton / flash backend must take it
    model = Both().cuda().to(torch.bfloat16).eval()
    x = torch.randn(2, 256, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = torch.compile(model, backend="attn_ops", fullgraph=True)(x)
        assert_close(out, model(x), *TOLERANCES[torch.bfloat16])
    assert counters["graph_passes"]["sdpa_to_prefill"] == 1
    # On torch 2.11 with CUDA bf16 the pattern matcher bound no scale constant for the
    # hand-written form (seen on an H100, 2026-11-21): the pass leaves it alone (logged) rather
    # than guess. torch >= 2.13 binds it and substitutes.
    expected = 1 if torch.__version__ >= "2.13" else 0
    assert counters["graph_passes"]["handwritten_to_prefill"] == expected
