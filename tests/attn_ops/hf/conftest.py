"""Tiny random-weight transformers models on attn_implementation="attn_ops", and op counting."""

import pytest
import torch
from torch.profiler import profile

transformers = pytest.importorskip("transformers")

import attn_ops.hf  # noqa: E402

OP_EVENTS = ("attn::decode", "attn::prefill")


def attn_events(fn):
    """``(fn(), {"attn::decode": n, "attn::prefill": m})``: the attn ops' profiler events while
    ``fn`` runs (what counts calls in compiled code too; run compiled code once before, or the
    tracing's fake calls count as well)."""
    with profile() as prof:
        result = fn()
    counts = dict.fromkeys(OP_EVENTS, 0)
    for e in prof.key_averages():
        if e.key in counts:
            counts[e.key] = e.count
    return result, counts


def sharpen(model, factor=8.0):
    """Larger q/k weights: peaked attention, so a wrong mask, window or key range shows."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return model


def greedy(model, impl, ids, **kw):
    """Greedy tokens of ``model.generate`` under attention implementation ``impl``."""
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model.generate(ids, do_sample=False, **kw)


@pytest.fixture(scope="package")
def llama():
    """2 layers, hidden 64, 4 heads over 2 kv heads (head dim 16)."""
    attn_ops.hf.register()
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="attn_ops")
    assert model.config._attn_implementation == "attn_ops"
    return sharpen(model.eval())


@pytest.fixture
def events():
    """:func:`attn_events`, for the tests (helpers reach tests as fixtures here)."""
    return attn_events


@pytest.fixture
def generate():
    """:func:`greedy`."""
    return greedy
