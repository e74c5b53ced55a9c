"""Models beyond Llama on attn_implementation="attn_ops": Gemma2 (sliding window, softcap) and
gpt-oss (attention sinks), every call on the ops, tokens as eager."""

import pytest
import torch

from tests.support.helpers import assert_close

transformers = pytest.importorskip("transformers")

import attn_ops.hf  # noqa: E402

SINKS_ARG = 8  # attn.decode's sinks; attn.prefill's is 12


def logits(model, impl, ids, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, **kw).logits


# ---------------------------------------------------------------------------------------------
# Gemma2: a 6-token sliding window (it bites in a 20-token prompt) and a softcap of 5
# ---------------------------------------------------------------------------------------------

def _gemma2(sliding_window=6, softcap=5.0):
    attn_ops.hf.register()
    cfg = transformers.Gemma2Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=sliding_window,
        attn_logit_softcapping=softcap, query_pre_attn_scalar=16, max_position_embeddings=64,
        final_logit_softcapping=None, pad_token_id=0,
        eos_token_id=None, bos_token_id=None)
    assert cfg.layer_types == ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="attn_ops")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model.eval()


@pytest.fixture(scope="module")
def gemma2():
    return _gemma2()


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_gemma2_generate_on_the_ops_matches_eager(gemma2, events, generate, cache, padding):
    ids = torch.randint(1, 97, (2, 20))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :5] = 0
    kw = dict(max_new_tokens=6, attention_mask=mask)
    if cache == "static":
        kw["cache_implementation"] = "static"
    expected = generate(gemma2, "eager", ids, **kw)
    attn_ops.hf.reset_stats()
    actual, counts = events(lambda: generate(gemma2, "attn_ops", ids, **kw))
    assert torch.equal(actual, expected)
    assert counts == {"attn::prefill": 2, "attn::decode": 10}
    assert attn_ops.hf.stats() == {"ops": 12}


def test_gemma2_window_and_softcap_change_the_logits(gemma2):
    """Without the window or the softcap the eager logits differ: the test above can see a
    dropped one. The ops' logits match eager's."""
    ids = torch.randint(1, 97, (2, 20))
    expected = logits(gemma2, "eager", ids)
    assert_close(logits(gemma2, "attn_ops", ids), expected, 2e-4, 2e-4, "gemma2 logits")
    for other in (_gemma2(sliding_window=64), _gemma2(softcap=None)):
        other.load_state_dict(gemma2.state_dict())
        assert not torch.allclose(logits(other, "eager", ids), expected, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# gpt-oss: attention sinks (the module's `sinks`, passed as the `s_aux` keyword)
# ---------------------------------------------------------------------------------------------

class SinksSpy(torch.utils._python_dispatch.TorchDispatchMode):
    """Whether each attn.prefill / attn.decode call had sinks."""

    def __init__(self):
        super().__init__()
        self.with_sinks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.attn.prefill.default:
            self.with_sinks.append(len(args) > 12 and args[12] is not None)
        if func is torch.ops.attn.decode.default:
            self.with_sinks.append(len(args) > SINKS_ARG and args[SINKS_ARG] is not None)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def gpt_oss():
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    attn_ops.hf.register()
    # Layer 0 slides over 4 keys (the window bites from 4 tokens on), layer 1 is full attention.
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
    with SinksSpy() as spy:
        actual = logits(gpt_oss, "attn_ops", ids)
    assert spy.with_sinks == [True, True]  # both layers (the window on the op), with sinks
    assert_close(actual, expected, 2e-4, 2e-4, "logits")
    attn = gpt_oss.model.layers[1].self_attn
    saved = attn.sinks.detach().clone()
    with torch.no_grad():
        attn.sinks.fill_(-float("inf"))  # no sink: must change the logits, or this test is blind
        without = logits(gpt_oss, "attn_ops", ids)
        attn.sinks.copy_(saved)
    assert not torch.allclose(without, expected, atol=1e-3)


def test_gpt_oss_generate_matches_eager(gpt_oss, generate):
    ids = torch.randint(1, 97, (2, 7))
    kw = dict(max_new_tokens=5, attention_mask=torch.ones_like(ids))
    expected = generate(gpt_oss, "eager", ids, **kw)
    with SinksSpy() as spy:
        actual = generate(gpt_oss, "attn_ops", ids, **kw)
    assert torch.equal(actual, expected)
    assert len(spy.with_sinks) == 2 * 5 and all(spy.with_sinks)


def test_gpt_oss_padding_runs_on_the_ops_keeping_the_sinks(gpt_oss):
    ids = torch.randint(1, 97, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    expected = logits(gpt_oss, "eager", ids, attention_mask=mask)
    with SinksSpy() as spy:
        actual = logits(gpt_oss, "attn_ops", ids, attention_mask=mask)
    assert spy.with_sinks == [True, True]
    assert_close(actual[0, 3:], expected[0, 3:], 2e-4, 2e-4, "padded row")
    assert_close(actual[1], expected[1], 2e-4, 2e-4, "unpadded row")


def test_a_sinks_call_that_falls_back_runs_the_models_eager(gpt_oss):
    """A custom 4D mask: transformers' SDPA would drop s_aux, so the model's eager runs it."""
    ids = torch.randint(1, 97, (2, 8))
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool).tril()
    mask[0, :, :, 0] = False
    additive = torch.where(mask, 0.0, float("-inf"))
    expected = logits(gpt_oss, "eager", ids, attention_mask=additive)
    attn_ops.hf.reset_stats()
    with SinksSpy() as spy:
        actual = logits(gpt_oss, "attn_ops", ids, attention_mask=mask)
    assert spy.with_sinks == []
    assert attn_ops.hf.stats() == {"fallback: an explicit attention mask (a custom pattern)": 2}
    assert_close(actual[:, 1:], expected[:, 1:], 2e-4, 2e-4, "logits")


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
