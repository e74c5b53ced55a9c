"""attn_implementation="attn_ops" on transformers' Llama: every attention call on the ops, the
cache read in place, tokens and logits as eager / sdpa."""

import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.support.helpers import assert_close

transformers = pytest.importorskip("transformers")

import attn_ops.hf  # noqa: E402

DECODE, PREFILL = torch.ops.attn.decode.default, torch.ops.attn.prefill.default


def _storage(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.untyped_storage().data_ptr()


class CacheArgs(TorchDispatchMode):
    """For every attn.decode / attn.prefill call: the op, the storages of its k_cache / v_cache
    arguments, and those of each layer's keys / values in ``cache`` at that moment."""

    def __init__(self, cache):
        super().__init__()
        self.cache, self.calls = cache, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (DECODE, PREFILL):
            layers = [(_storage(getattr(x, "keys", None)), _storage(getattr(x, "values", None)))
                      for x in self.cache.layers]
            self.calls.append((func, (_storage(args[1]), _storage(args[2])), layers))
        return func(*args, **(kwargs or {}))


def logits(model, impl, ids, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, **kw).logits


def test_prefill_logits_match_eager(llama, events):
    ids = torch.randint(1, 97, (3, 13))
    expected = logits(llama, "eager", ids)
    actual, counts = events(lambda: logits(llama, "attn_ops", ids))
    assert counts == {"attn::decode": 0, "attn::prefill": 2}  # one per layer
    assert_close(actual, expected, 2e-4, 2e-4, "logits")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_generate_runs_every_call_on_the_ops(llama, events, generate, cache, padding):
    """prefill: attn.prefill; each of the 5 decode steps: attn.decode; tokens as eager, sdpa."""
    ids = torch.randint(1, 97, (2, 9))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :4] = 0
    kw = dict(max_new_tokens=6, attention_mask=mask)
    if cache == "static":
        kw["cache_implementation"] = "static"
    expected = generate(llama, "eager", ids, **kw)
    assert torch.equal(generate(llama, "sdpa", ids, **kw), expected)
    attn_ops.hf.reset_stats()
    actual, counts = events(lambda: generate(llama, "attn_ops", ids, **kw))
    assert torch.equal(actual, expected)
    assert counts == {"attn::prefill": 2, "attn::decode": 10}
    assert attn_ops.hf.stats() == {"ops": 12}


def _teacher_forced(model, impl, ids, mask, steps, cache):
    """Prefill ``ids`` under ``mask``, then feed ``steps`` (a list of [B, n] chunks) one after
    the other; returns every forward's logits."""
    model.set_attn_implementation(impl)
    cfg = model.config
    cache = transformers.StaticCache(config=cfg, max_cache_len=24) if cache == "static" else \
        transformers.DynamicCache(config=cfg)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = []
    with torch.no_grad():
        out.append(model(ids, attention_mask=mask, cache=cache, position_ids=pos).logits)
        for chunk in steps:
            n = chunk.shape[1]
            mask = torch.cat([mask, torch.ones_like(chunk)], 1)
            pos = pos[:, -1:] + torch.arange(1, n + 1)
            out.append(model(chunk, attention_mask=mask, cache=cache, position_ids=pos).logits)
    return out


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_padding_anywhere_matches_eager_at_real_positions(llama, cache):
    """Right, left and inner padding: prefill, decode steps and a 2-token chunk over keys with
    holes. Padding queries are zero on the ops (as transformers' flash path unpads them), so
    only real positions are compared."""
    ids = torch.randint(1, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right
    mask[1, 4] = 0  # a hole
    mask[2, :2] = 0  # left
    steps = [torch.randint(1, 97, (3, 1)), torch.randint(1, 97, (3, 2)),
             torch.randint(1, 97, (3, 1))]
    expected = _teacher_forced(llama, "eager", ids, mask, steps, cache)
    attn_ops.hf.reset_stats()
    actual = _teacher_forced(llama, "attn_ops", ids, mask, steps, cache)
    assert attn_ops.hf.stats() == {"ops": 2 * 4}
    real = mask.bool()
    assert_close(actual[0][real], expected[0][real], 2e-4, 2e-4, "prefill, real positions")
    for i, (a, e) in enumerate(zip(actual[1:], expected[1:])):
        assert_close(a, e, 2e-4, 2e-4, f"step {i}")
    unpadded = _teacher_forced(llama, "eager", ids, torch.ones_like(ids), steps, cache)
    assert not torch.allclose(unpadded[1], expected[1], atol=1e-2), \
        "the padding must change the logits, or this test cannot see it dropped"


def test_static_cache_without_a_mask_reads_the_written_prefix(llama):
    """No 2D mask: a StaticCache's sequences read cache_position's prefix (one block each)."""
    ids, nxt = torch.randint(1, 97, (2, 7)), torch.randint(1, 97, (2, 1))

    def run(impl):
        llama.set_attn_implementation(impl)
        cache = transformers.StaticCache(config=llama.config, max_cache_len=16)
        with torch.no_grad():
            return llama(ids, cache=cache).logits, llama(nxt, cache=cache).logits

    expected = run("eager")
    attn_ops.hf.reset_stats()
    actual = run("attn_ops")
    assert attn_ops.hf.stats() == {"ops": 4}
    assert_close(actual[0], expected[0], 2e-4, 2e-4, "prefill")
    assert_close(actual[1], expected[1], 2e-4, 2e-4, "decode")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padded", [False, True])
def test_the_cache_is_read_in_place(llama, cache, padded):
    """The op's k_cache / v_cache share the storage of the cache's own tensors: no copy."""
    ids = torch.randint(1, 97, (2, 6))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :2] = 0
    llama.set_attn_implementation("attn_ops")
    kv = transformers.StaticCache(config=llama.config, max_cache_len=12) if cache == "static" \
        else transformers.DynamicCache(config=llama.config)
    with torch.no_grad(), CacheArgs(kv) as spy:
        llama(ids, attention_mask=mask, cache=kv)
        llama(torch.randint(1, 97, (2, 1)), attention_mask=torch.cat(
            [mask, torch.ones(2, 1, dtype=mask.dtype)], 1), cache=kv)
    assert [c[0] for c in spy.calls] == [PREFILL] * 2 + [DECODE] * 2
    for layer, (_, caches, layers) in zip([0, 1, 0, 1], spy.calls):
        assert caches == layers[layer]


def test_compiled_static_generate_runs_on_the_ops_without_recompiles(llama, events, generate):
    """torch.compile(model.forward, fullgraph=True) with a StaticCache and a left-padded batch:
    one graph for the prefill, one for every decode position; profiler events count the ops."""
    from torch._dynamo.testing import CompileCounterWithBackend
    ids = torch.randint(1, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kw = dict(max_new_tokens=8, attention_mask=mask, cache_implementation="static")
    expected = generate(llama, "eager", ids, **kw)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    forward = llama.forward
    llama.forward = torch.compile(forward, backend=counter, fullgraph=True)
    try:
        assert torch.equal(generate(llama, "attn_ops", ids, **kw), expected)
        assert counter.frame_count == 2  # prefill, decode: no recompile per position
        actual, counts = events(lambda: generate(llama, "attn_ops", ids, **kw))
    finally:
        llama.forward = forward
        torch._dynamo.reset()
    assert torch.equal(actual, expected)
    assert counter.frame_count == 2
    assert counts == {"attn::prefill": 2, "attn::decode": 14}  # 7 decode forwards, 2 layers


def test_compiled_decode_loop_without_a_mask_does_not_recompile(llama, events):
    """The "positions" path (StaticCache, no 2D mask) compiled: 4 positions, one graph."""
    from torch._dynamo.testing import CompileCounterWithBackend
    ids, steps = torch.randint(1, 97, (2, 5)), torch.randint(1, 97, (4, 2, 1))

    def run(impl, model):
        llama.set_attn_implementation(impl)
        cache = transformers.StaticCache(config=llama.config, max_cache_len=12)
        with torch.no_grad():
            llama(ids, cache=cache)
            return [model(s, cache=cache).logits for s in steps]

    expected = run("eager", llama)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(llama, backend=counter, fullgraph=True)
    try:
        actual, counts = events(lambda: run("attn_ops", compiled))
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1
    for a, e in zip(actual, expected):
        assert_close(a, e, 2e-4, 2e-4, "compiled decode")
    assert counts["attn::decode"] >= 4 * 2  # plus the tracing's fake calls


def test_custom_4d_mask_falls_back_with_a_reason(llama):
    """A 4D mask that is not padding (two blocks that do not see each other) goes to SDPA."""
    ids = torch.randint(1, 97, (2, 8))
    i = torch.arange(8)
    custom = ((i[:, None] >= i[None, :]) & ((i[:, None] < 4) == (i[None, :] < 4)))
    custom = custom[None, None].expand(2, 1, 8, 8)
    expected = logits(llama, "sdpa", ids, attention_mask=custom)
    attn_ops.hf.reset_stats()
    actual = logits(llama, "attn_ops", ids, attention_mask=custom)
    assert attn_ops.hf.stats() == {"fallback: an explicit attention mask (a custom pattern)": 2}
    assert_close(actual, expected, 2e-4, 2e-4, "custom mask")
    assert not torch.allclose(logits(llama, "sdpa", ids), expected, atol=1e-2)


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


def test_direct_calls_sliding_window_and_empty_static_cache():
    """window_left = sliding_window - 1; a None mask over more keys than queries reads Sq."""
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


def test_stats_count_calls_on_the_ops_and_fallbacks_by_reason(llama):
    ids = torch.randint(1, 97, (2, 8))
    attn_ops.hf.reset_stats()
    logits(llama, "attn_ops", ids)
    assert attn_ops.hf.stats() == {"ops": 2}, "one call per layer"
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool).tril()
    mask[0, :, :, 0] = False
    logits(llama, "attn_ops", ids, attention_mask=mask)
    reason = "fallback: an explicit attention mask (a custom pattern)"
    assert attn_ops.hf.stats() == {"ops": 2, reason: 2}
    attn_ops.hf.reset_stats()
    assert attn_ops.hf.stats() == {}
