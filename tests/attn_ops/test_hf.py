"""attn_implementation="attn_ops" on transformers' Llama: same logits and tokens as eager."""

import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.support.helpers import assert_close

transformers = pytest.importorskip("transformers")

import attn_ops.hf  # noqa: E402

PREFILL = torch.ops.attn.prefill.default


class OpSpy(TorchDispatchMode):
    """Counts the attn.prefill calls that run while it is active, and whether each had sinks."""

    def __init__(self):
        super().__init__()
        self.prefill_calls = 0
        self.with_sinks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is PREFILL:
            self.prefill_calls += 1
            self.with_sinks.append(len(args) > 12 and args[12] is not None)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def llama():
    attn_ops.hf.register()
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="attn_ops")
    assert model.config._attn_implementation == "attn_ops"
    model.eval()
    with torch.no_grad():  # larger q/k weights: peaked attention, so a wrong mask shows
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def logits(model, impl, ids, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, **kw).logits


def test_prefill_logits_match_eager(llama):
    ids = torch.randint(1, 97, (3, 13))
    expected = logits(llama, "eager", ids)
    with OpSpy() as spy:
        actual = logits(llama, "attn_ops", ids)
    assert spy.prefill_calls == llama.config.num_hidden_layers
    assert_close(actual, expected, 2e-4, 2e-4, "logits")


def test_greedy_generate_with_cache_matches_eager(llama):
    """Decode steps (one query over the DynamicCache's keys) go through attn.prefill too."""
    ids = torch.randint(1, 97, (2, 9))
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    llama.set_attn_implementation("eager")
    with torch.no_grad():
        expected = llama.generate(ids, **kw)
    llama.set_attn_implementation("attn_ops")
    with torch.no_grad(), OpSpy() as spy:
        actual = llama.generate(ids, **kw)
    assert torch.equal(actual, expected)
    # prefill + 5 cached steps (the 6th token needs no forward), per layer
    assert spy.prefill_calls == 6 * llama.config.num_hidden_layers


def test_compiles_fullgraph_with_attn_prefill_in_the_graph(llama):
    """The attention function traces without graph breaks; Dynamo's graph calls the op."""
    from torch._dynamo.testing import CompileCounterWithBackend
    ids = torch.randint(1, 97, (2, 11))
    expected = logits(llama, "eager", ids)
    llama.set_attn_implementation("attn_ops")
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    with torch.no_grad():
        actual = torch.compile(llama, backend=counter, fullgraph=True)(ids).logits
    assert counter.frame_count == 1
    targets = [n.target for g in counter.graphs for n in g.graph.nodes]
    assert sum(t in (torch.ops.attn.prefill, PREFILL) for t in targets) == 2
    assert_close(actual, expected, 2e-4, 2e-4, "compiled logits")


def test_padding_mask_falls_back_to_sdpa(llama):
    """Left padding makes transformers build a boolean mask: the call must honour it (SDPA)."""
    ids = torch.randint(1, 97, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    expected = logits(llama, "eager", ids, attention_mask=mask)
    with OpSpy() as spy:
        actual = logits(llama, "attn_ops", ids, attention_mask=mask)
    assert spy.prefill_calls == 0
    # padded query rows attend to nothing meaningful in either implementation: compare real ones
    assert_close(actual[0, 4:], expected[0, 4:], 2e-4, 2e-4, "padded row")
    assert_close(actual[1], expected[1], 2e-4, 2e-4, "unpadded row")
    no_mask = logits(llama, "eager", ids)
    assert not torch.allclose(no_mask[0, 4:], expected[0, 4:], atol=1e-2), \
        "the padding must change the logits, or this test cannot see a dropped mask"


def test_fallback_reasons(llama):
    attn = llama.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    reason = attn_ops.hf.fallback_reason
    assert reason(attn, q, k, k, None, 0.0, True, None, {}) is None
    assert "mask" in reason(attn, q, k, k, torch.ones(1, 1, 5, 5, dtype=torch.bool), 0.0, True,
                            None, {})
    assert "dropout" in reason(attn, q, k, k, None, 0.1, True, None, {})
    with torch.enable_grad():
        assert "gradients" in reason(attn, q.requires_grad_(), k, k, None, 0.0, True, None, {})
    assert "head dim" in reason(attn, torch.randn(1, 4, 5, 12), torch.randn(1, 2, 5, 12),
                                torch.randn(1, 2, 5, 12), None, 0.0, True, None, {})
    assert "window" in reason(attn, q.detach(), k, k, None, 0.0, False, 4, {})


def test_sliding_window_and_static_cache_prefill():
    """Direct calls: window_left = sliding_window - 1; extra static-cache keys are dropped."""
    class Mod(torch.nn.Module):
        is_causal = True
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    window = (j <= i) & (j > i - 3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=window)
    out, _ = attn_ops.hf.attn_ops_attention_forward(Mod(), q, k, v, None, scaling=None,
                                                    sliding_window=3)
    assert_close(out, expected.transpose(1, 2), 1e-5, 1e-5, "sliding window")
    garbage = torch.full((2, 2, 4, 16), float("nan"))
    out, _ = attn_ops.hf.attn_ops_attention_forward(
        Mod(), q, torch.cat([k, garbage], 2), torch.cat([v, garbage], 2), None)
    causal = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    assert_close(out, causal.transpose(1, 2), 1e-5, 1e-5, "static cache prefill")


def test_import_does_not_import_transformers():
    code = ("import sys, attn_ops, attn_ops.hf, attn_ops.demo.job; "
            "assert 'transformers' not in sys.modules, 'transformers imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# gpt-oss: attention sinks (the module's `sinks`, passed as the `s_aux` keyword)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt_oss():
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    attn_ops.hf.register()
    # Layer 0 slides over 4 keys (its mask bites from 4 tokens on: the model's eager runs it),
    # layer 1 is full attention (attn.prefill with sinks).
    cfg = transformers.GptOssConfig(
        vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=4, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0, eos_token_id=None,
        bos_token_id=None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="attn_ops")
    model.eval()
    with torch.no_grad():  # sinks of a size that matters, peaked attention
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(4) * 2)
            layer.self_attn.q_proj.weight.mul_(4)
    return model


def test_gpt_oss_sinks_run_on_the_op_and_match_eager(gpt_oss):
    ids = torch.randint(1, 97, (2, 11))
    expected = logits(gpt_oss, "eager", ids)
    with OpSpy() as spy:
        actual = logits(gpt_oss, "attn_ops", ids)
    assert spy.with_sinks == [True]  # the full-attention layer, with its sinks
    assert_close(actual, expected, 2e-4, 2e-4, "logits")
    attn = gpt_oss.model.layers[1].self_attn
    saved = attn.sinks.detach().clone()
    with torch.no_grad():
        attn.sinks.fill_(-float("inf"))  # no sink: must change the logits, or this test is blind
        without = logits(gpt_oss, "attn_ops", ids)
        attn.sinks.copy_(saved)
    assert not torch.allclose(without, expected, atol=1e-3)


def test_gpt_oss_generate_matches_eager(gpt_oss):
    ids = torch.randint(1, 97, (2, 7))
    kw = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids))
    gpt_oss.set_attn_implementation("eager")
    with torch.no_grad():
        expected = gpt_oss.generate(ids, **kw)
    gpt_oss.set_attn_implementation("attn_ops")
    with torch.no_grad(), OpSpy() as spy:
        actual = gpt_oss.generate(ids, **kw)
    assert torch.equal(actual, expected)
    assert spy.with_sinks and all(spy.with_sinks)


def test_gpt_oss_padding_falls_back_to_eager_keeping_the_sinks(gpt_oss):
    """transformers' SDPA function ignores s_aux: a sinks call with a mask must not go there."""
    ids = torch.randint(1, 97, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    expected = logits(gpt_oss, "eager", ids, attention_mask=mask)
    with OpSpy() as spy:
        actual = logits(gpt_oss, "attn_ops", ids, attention_mask=mask)
    assert spy.with_sinks == []
    assert_close(actual[0, 3:], expected[0, 3:], 2e-4, 2e-4, "padded row")
    assert_close(actual[1], expected[1], 2e-4, 2e-4, "unpadded row")


def test_sinks_fallback_reasons(gpt_oss):
    attn = gpt_oss.model.layers[1].self_attn
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    reason = attn_ops.hf.fallback_reason
    assert reason(attn, q, k, k, None, 0.0, True, None, {"s_aux": attn.sinks.detach()}) is None
    assert "one per query head" in reason(attn, q, k, k, None, 0.0, True, None,
                                          {"s_aux": torch.zeros(3)})
    with torch.enable_grad():
        assert "gradients" in reason(attn, q, k, k, None, 0.0, True, None,
                                     {"s_aux": attn.sinks})


def test_stats_count_calls_on_the_ops_and_fallbacks_by_reason(llama):
    ids = torch.randint(1, 97, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    attn_ops.hf.reset_stats()
    logits(llama, "attn_ops", ids)
    assert attn_ops.hf.stats() == {"ops": 2}, "one call per layer"
    logits(llama, "attn_ops", ids, attention_mask=mask)
    reason = "fallback: an explicit attention mask (padding or a custom pattern)"
    assert attn_ops.hf.stats() == {"ops": 2, reason: 2}
    attn_ops.hf.reset_stats()
    assert attn_ops.hf.stats() == {}
