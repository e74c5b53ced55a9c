"""SDPA over a static KV cache (gpt-fast style) -> attn.decode reading only the valid prefix.

A decode step writes its token at ``input_pos`` and attends over the whole cache with a mask
that hides later keys; the pass proves the mask is "key j iff j <= input_pos[i]" and calls
``attn.decode`` on the cache itself (a view, no copy), with ``seqlens_k = input_pos + 1``
computed on the device. Compared step by step with an eager copy of the model (caches
included); positions change every step without a recompile. Several queries at consecutive
positions (a prefill chunk) become a paged attn.prefill; gpt-fast's ``causal_mask`` buffer is
accepted with an on-device check of its rows. A heads-major cache ``[B, Hkv, S_max, D]``
(gpt-fast's, transformers' StaticCache) goes to the ops as ``cache.transpose(1, 2)``, a strided
view (one block per sequence, no copy). Masks: bool, additive 0 / dtype-min, additive 0 / -inf
(``masked_fill`` or ``torch.where``), a window. What stays put: a window other than the causal
band, an unchecked buffer, a backend that refuses strided caches (more in
test_handwritten_over_cache.py, for both passes).
"""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import attn_ops  # noqa: F401
import graph_passes
from graph_passes.testing import inspecting_backend
from tests.support.attention_models import CacheAttention, TinyGptFast
from tests.support.helpers import TOLERANCES, assert_close

DECODE = torch.ops.attn.decode.default
PREFILL = torch.ops.attn.prefill.default
TOL = TOLERANCES[torch.float32]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """CPU "auto" does not substitute (pure-torch backends are slower): choose the reference."""
    monkeypatch.setenv("ATTN_OPS_BACKEND", "reference")


def _decode_steps(model, positions, backend, batch=2):
    """Prefill positions 0..3 eagerly in both copies, then one compiled decode step per position
    against eager; returns the compiled model's graphs."""
    eager, compiled_model = model.eval(), copy.deepcopy(model).eval()
    counters.clear()
    torch._dynamo.reset()
    graphs = {}
    step = torch.compile(compiled_model, backend=backend(graphs), fullgraph=True)
    with torch.no_grad():
        prompt, pos = torch.randn(batch, 4, 64), torch.arange(4)
        eager(prompt, pos), compiled_model(prompt, pos)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for p in positions:
                x, pos = torch.randn(batch, 1, 64), torch.tensor([p])
                assert_close(step(x, pos), eager(x, pos), *TOL, what=f"position {p}")
        assert torch.equal(compiled_model.k_cache, eager.k_cache), "the cache writes stay"
    return graphs


def _inspecting(options=None):
    return lambda graphs: inspecting_backend(options, graphs)


@pytest.mark.parametrize("gqa,mask", [("repeat_interleave", "indexed_tril"),
                                      ("sdpa", "arange"), ("repeat_interleave", "additive"),
                                      ("sdpa", "additive_inf"), ("repeat_kv", "where_inf"),
                                      ("repeat_interleave", "buffer"), ("sdpa", "window")])
def test_decode_over_a_token_major_cache(gqa, mask):
    model = CacheAttention(layout="token_major", gqa=gqa, mask=mask)
    graphs = _decode_steps(model, [4, 5, 11, 23], _inspecting())
    assert counters["graph_passes"]["sdpa_to_decode"] == 1
    assert counters["graph_passes"]["sdpa_to_prefill_left_alone"] == 0
    (node,) = [n for n in graphs["aten"].graph.nodes if n.target is DECODE]
    k_cache = node.args[1].meta["val"]
    assert list(k_cache.shape) == [2, 24, 2, 16] and k_cache.is_contiguous(), \
        "the cache itself (Hkv heads, token-major), not a copy or an expansion"
    window_left = node.args[6] if len(node.args) > 6 else node.kwargs.get("window_left", -1)
    assert window_left == (3 if mask == "window" else -1)
    assert not [n for n in graphs["aten"].graph.nodes if "scaled_dot_product" in str(n.target)]
    asserts = [n for n in graphs["dynamo"].graph.nodes if "_assert_async" in str(n.target)]
    assert len(asserts) == (mask == "buffer"), "only a buffer's data is checked at run time"


def _cache_view_of_buffer(node):
    """The decode/prefill node's k_cache argument: the cache buffer (in the functional aten
    graph: the index_put that writes the step's token into it, which Inductor does in place)
    viewed ``[B, S_max, Hkv, D]`` by a permute, with no copy between."""
    cache = node.args[1]
    assert cache.target is torch.ops.aten.permute.default and cache.args[1] == [0, 2, 1, 3]
    written = cache.args[0]
    assert written.target is torch.ops.aten.index_put.default, written
    assert written.args[0].op == "placeholder", "the buffer itself, not a copy"
    return cache.meta["val"]


@pytest.mark.parametrize("gqa,mask", [("repeat_interleave", "buffer"), ("sdpa", "indexed_tril"),
                                      ("repeat_interleave", "additive"), ("sdpa", "window")])
def test_decode_over_a_heads_major_cache(gqa, mask):
    """gpt-fast's own layout: ``k_cache[:, :, input_pos] = k`` into ``[B, Hkv, S_max, D]``."""
    model = CacheAttention(layout="heads_major", gqa=gqa, mask=mask)
    graphs = _decode_steps(model, [4, 5, 11, 23], _inspecting())
    assert counters["graph_passes"]["sdpa_to_decode"] == 1
    assert counters["graph_passes"]["sdpa_to_prefill_left_alone"] == 0
    (node,) = [n for n in graphs["aten"].graph.nodes if n.target is DECODE]
    k_cache = _cache_view_of_buffer(node)
    assert list(k_cache.shape) == [2, 24, 2, 16] and k_cache.stride() == (768, 16, 384, 1)
    assert not [n for n in graphs["aten"].graph.nodes if "scaled_dot_product" in str(n.target)]
    assert not [n for n in graphs["aten"].graph.nodes if n.target in (
        torch.ops.aten.clone.default, torch.ops.aten.contiguous.default)], "no cache copy"


@pytest.mark.parametrize("gqa", ["repeat_interleave", "sdpa"])
def test_heads_major_cache_with_inductor(gqa):
    model = CacheAttention(layout="heads_major", gqa=gqa, mask="buffer")
    with torch._inductor.config.patch(fx_graph_cache=False):
        _decode_steps(model, [4, 9, 23], lambda graphs: "attn_ops")
    assert counters["graph_passes"]["sdpa_to_decode"] == 1


def test_a_backend_that_refuses_strided_caches_leaves_heads_major_ones_alone(monkeypatch,
                                                                            caplog):
    from attn_ops.backends import reference
    monkeypatch.setattr(reference, "supports", lambda config: None if config.cache_contiguous
                        else "strided caches are refused here")
    with caplog.at_level(logging.DEBUG, logger="graph_passes"):
        _decode_steps(CacheAttention(layout="heads_major"), [4], _inspecting())
        assert counters["graph_passes"]["sdpa_to_decode"] == 0
        assert "strided caches are refused here" in caplog.text
        _decode_steps(CacheAttention(layout="token_major"), [4], _inspecting())
        assert counters["graph_passes"]["sdpa_to_decode"] == 1, "a contiguous view still goes"


def test_a_buffer_mask_that_is_not_causal_raises_instead_of_attending_differently():
    model = CacheAttention(mask="buffer").eval()
    step = torch.compile(model, backend=inspecting_backend(), fullgraph=True)
    x, pos = torch.randn(2, 1, 64), torch.tensor([5])
    torch._dynamo.reset()
    with torch.no_grad():
        step(x, pos)
        model.causal_mask.fill_(True)  # every key visible: no longer "j <= pos"
        with pytest.raises(RuntimeError, match="read from a buffer is not"):
            step(x, pos)


def test_unchecked_buffer_masks_stay_on_sdpa(caplog):
    model = CacheAttention(mask="buffer")
    with caplog.at_level(logging.DEBUG, logger="graph_passes"):
        _decode_steps(model, [4], _inspecting({"checked_masks": False}))
    assert counters["graph_passes"]["sdpa_to_decode"] == 0
    assert "depends on the input or attribute" in caplog.text


@pytest.mark.parametrize("mask", ["indexed_tril", "buffer"])
def test_decode_with_inductor(mask):
    model = CacheAttention(layout="token_major", gqa="sdpa", mask=mask)
    with torch._inductor.config.patch(fx_graph_cache=False):
        _decode_steps(model, [4, 9], lambda graphs: "attn_ops")
    assert counters["graph_passes"]["sdpa_to_decode"] == 1
    if mask == "buffer":  # the on-device check survives Inductor
        model.causal_mask.fill_(True)
        step = torch.compile(model.eval(), backend="attn_ops", fullgraph=True)
        with torch.no_grad(), pytest.raises(RuntimeError, match="read from a buffer is not"):
            step(torch.randn(2, 1, 64), torch.tensor([9]))


@pytest.mark.parametrize("kwargs,reason", [
    (dict(mask="window_off_by_one"), "not provably causal"),
])
def test_left_alone(kwargs, reason, caplog):
    model = CacheAttention(**kwargs)
    with caplog.at_level(logging.DEBUG, logger="graph_passes"):
        graphs = _decode_steps(model, [4, 7], _inspecting())
    assert counters["graph_passes"]["sdpa_to_decode"] == 0
    assert counters["graph_passes"]["sdpa_to_prefill_left_alone"] >= 1
    assert not [n for n in graphs["aten"].graph.nodes if n.target is DECODE]
    assert reason in caplog.text


@pytest.mark.parametrize("mask", ["indexed_tril", "buffer", "additive", "additive_inf"])
def test_prefill_chunks_over_the_cache(mask):
    """Several queries at consecutive positions: a paged attn.prefill, chunk after chunk."""
    model = CacheAttention(mask=mask).eval()
    eager = copy.deepcopy(model)
    counters.clear()
    torch._dynamo.reset()
    graphs = {}
    step = torch.compile(model, backend=inspecting_backend(None, graphs), fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for start in (0, 5, 17):  # the prompt, then two more chunks of 5 (the last ends at 22)
            x, pos = torch.randn(2, 5, 64), torch.arange(start, start + 5)
            assert_close(step(x, pos), eager(x, pos), *TOL, what=f"chunk at {start}")
    assert counters["graph_passes"]["sdpa_over_cache_to_prefill"] == 1
    (node,) = [n for n in graphs["aten"].graph.nodes if n.target is PREFILL]
    assert node.args[9] is not None and list(node.args[1].meta["val"].shape) == [2, 24, 2, 16], \
        "the cache itself, read through a block table"


def test_positions_that_are_not_consecutive_raise():
    model = CacheAttention().eval()
    step = torch.compile(model, backend=inspecting_backend(), fullgraph=True)
    torch._dynamo.reset()
    with torch.no_grad():
        step(torch.randn(2, 3, 64), torch.tensor([0, 1, 2]))
        with pytest.raises(RuntimeError, match="not consecutive"):
            step(torch.randn(2, 3, 64), torch.tensor([3, 5, 4]))


def test_exported_decode_step():
    model = CacheAttention(gqa="sdpa").eval()
    eager = copy.deepcopy(model)
    x, pos = torch.randn(2, 1, 64), torch.tensor([6])
    counters.clear()
    program = graph_passes.substitute_attention(torch.export.export(model, (x, pos)))
    assert counters["graph_passes"]["sdpa_to_decode"] == 1
    assert [n.target for n in program.graph.nodes if "attn" in str(n.target)] == [DECODE]
    with torch.no_grad():
        assert_close(program.module()(x, pos), eager(x, pos), *TOL)


def _generate(model, prompt, steps):
    """Greedy: the prompt in one call at positions 0..T-1, then one token per call."""
    ids, tokens = prompt, []
    logits = model(ids, torch.arange(prompt.shape[1]))
    for p in range(prompt.shape[1], prompt.shape[1] + steps):
        ids = logits[:, -1:].argmax(-1)
        tokens.append(int(ids))
        logits = model(ids, torch.tensor([p]))
    return tokens


@pytest.mark.parametrize("gqa,mask,layout", [
    ("repeat_interleave", "buffer", "token_major"), ("sdpa", "arange", "token_major"),
    ("repeat_interleave", "buffer", "heads_major"), ("sdpa", "buffer", "heads_major")])
def test_greedy_generate_runs_every_attention_on_the_ops(gqa, mask, layout):
    torch.manual_seed(0)
    model = TinyGptFast(gqa=gqa, mask=mask, layout=layout, h=4, hkv=2, d=16, s_max=24).eval()
    eager = copy.deepcopy(model)
    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=inspecting_backend(), fullgraph=True)
    prompt = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        expected = _generate(eager, prompt, 9)
        assert _generate(compiled, prompt, 9) == expected, "greedy tokens identical to eager"
        with torch.profiler.profile() as prof:  # compiled already: count what the steps run
            assert _generate(compiled, prompt, 9) == expected
    names = [e.name for e in prof.events()]
    assert names.count("attn::prefill") == 2 and names.count("attn::decode") == 2 * 9, \
        "every layer of every step on the ops"
    assert not [n for n in names if "scaled_dot_product" in n]
    assert counters["graph_passes"]["sdpa_to_decode"] == 2
    assert counters["graph_passes"]["sdpa_over_cache_to_prefill"] == 2
    assert counters["stats"]["unique_graphs"] == 2, "one prompt graph, one decode graph"


class CountedCacheAttention(CacheAttention):
    """transformers' StaticCache way: a 0-d ``length`` buffer counts the cached tokens; the step
    builds its positions as ``length + arange(S)``, masks with them, then bumps ``length`` in
    place (``write_first``: also writes it before building the mask, a +s then -s that leaves
    the value as it was but which the prover cannot see through)."""

    def __init__(self, write_first=False, **kw):
        super().__init__(**kw)
        self.write_first = write_first
        self.register_buffer("length", torch.tensor(0))

    def forward(self, x):
        b, s, _ = x.shape
        if self.write_first:
            self.length.add_(s)
            self.length.sub_(s)
        pos = torch.arange(s) + self.length
        keep = torch.arange(self.s_max)[None, :] <= pos[:, None]
        self.length.add_(s)
        q = self.q(x).view(b, s, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.hkv, self.d).unbind(2)
        self.k_cache[:, pos] = k
        self.v_cache[:, pos] = v
        y = F.scaled_dot_product_attention(q, self.k_cache.transpose(1, 2),
                                           self.v_cache.transpose(1, 2), attn_mask=keep,
                                           enable_gqa=True)
        return y.transpose(1, 2).reshape(b, s, self.h * self.d)


def test_positions_counted_in_a_buffer_written_after_the_mask():
    model = CountedCacheAttention().eval()
    eager = copy.deepcopy(model)
    counters.clear()
    torch._dynamo.reset()
    graphs = {}
    step = torch.compile(model, backend=inspecting_backend(None, graphs), fullgraph=True,
                         dynamic=False)  # a symbolic number of queries is left alone
    with torch.no_grad():
        for s in (5, 1, 1, 3):  # a prompt, two decode steps, a chunk: one graph per length
            x = torch.randn(2, s, 64)
            assert_close(step(x), eager(x), *TOL, what=f"{s} tokens at {int(eager.length)}")
    assert int(model.length) == int(eager.length) == 10
    assert counters["graph_passes"]["sdpa_to_decode"] == 1
    assert counters["graph_passes"]["sdpa_over_cache_to_prefill"] == 2
    asserts = [n for n in graphs["dynamo"].graph.nodes if "_assert_async" in str(n.target)]
    assert not asserts, "length + arange is consecutive by construction: nothing to check"


def test_positions_written_before_the_mask_reads_them_stay_on_sdpa(caplog):
    model = CountedCacheAttention(write_first=True).eval()
    with caplog.at_level(logging.DEBUG, logger="graph_passes"), torch.no_grad():
        counters.clear()
        torch._dynamo.reset()
        torch.compile(model, backend=inspecting_backend(), fullgraph=True)(torch.randn(2, 1, 64))
    assert counters["graph_passes"]["sdpa_to_decode"] == 0
    assert "written in place before the mask reads it" in caplog.text


def _static_cache_generate(forward, cfg, prompt, steps):
    """Greedy tokens of a transformers model over a fresh StaticCache: the prompt, then one
    token per call."""
    import transformers
    cache = transformers.StaticCache(config=cfg, max_cache_len=32)
    out = forward(prompt, past_key_values=cache, use_cache=True)
    tokens = []
    for _ in range(steps):
        ids = out.logits[:, -1:].argmax(-1)
        tokens.append(int(ids))
        out = forward(ids, past_key_values=cache, use_cache=True)
    return tokens


def test_transformers_static_cache_decode_runs_on_the_ops():
    """transformers' StaticCache keeps heads-major [B, Hkv, S_max, D] caches and builds the
    decode mask from cumulative_length + arange (proven): with the ops reading the caches
    through their strides, every decode step of every layer runs attn.decode, compiled with
    backend="attn_ops" (Inductor), greedy tokens identical to eager, one graph for all decode
    positions."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    prompt = torch.randint(1, 97, (1, 5))
    counters.clear()
    torch._dynamo.reset()
    forward = torch.compile(model.forward, backend="attn_ops", fullgraph=True)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        expected = _static_cache_generate(model.forward, cfg, prompt, 6)
        assert _static_cache_generate(forward, cfg, prompt, 6) == expected
        with torch.profiler.profile() as prof:  # compiled already: count what the steps run
            assert _static_cache_generate(forward, cfg, prompt, 6) == expected
    names = [e.name for e in prof.events()]
    assert names.count("attn::decode") == 2 * 6, "every layer of every decode step on the ops"
    assert names.count("attn::prefill") == 2, "and the prompt"
    assert not [n for n in names if "scaled_dot_product" in n]
    assert counters["graph_passes"]["sdpa_to_decode"] == 2
    assert counters["stats"]["unique_graphs"] == 2, "one prompt graph, one decode graph"


class SharedBufferMask(torch.nn.Module):
    """gpt-fast's shape: one ``causal_mask[None, None, input_pos]`` built once per step and read
    by every layer's SDPA over its own heads-major cache."""

    def __init__(self, layers=3, s_max=24, h=4, hkv=2, d=16, batch=2):
        super().__init__()
        self.h, self.hkv, self.d = h, hkv, d
        self.proj = torch.nn.ModuleList(torch.nn.Linear(64, (h + 2 * hkv) * d)
                                        for _ in range(layers))
        self.out = torch.nn.ModuleList(torch.nn.Linear(h * d, 64) for _ in range(layers))
        self.register_buffer("causal_mask", torch.tril(torch.ones(s_max, s_max, dtype=torch.bool)))
        for i in range(layers):
            self.register_buffer(f"k_cache{i}", torch.randn(batch, hkv, s_max, d))
            self.register_buffer(f"v_cache{i}", torch.randn(batch, hkv, s_max, d))

    def forward(self, x, input_pos):
        b, s, _ = x.shape
        mask = self.causal_mask[None, None, input_pos]
        for i, (proj, out) in enumerate(zip(self.proj, self.out)):
            q, k, v = proj(x).split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], -1)
            q = q.view(b, s, self.h, self.d).transpose(1, 2)
            kc, vc = getattr(self, f"k_cache{i}"), getattr(self, f"v_cache{i}")
            kc[:, :, input_pos] = k.view(b, s, self.hkv, self.d).transpose(1, 2)
            vc[:, :, input_pos] = v.view(b, s, self.hkv, self.d).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)
            x = x + out(o.transpose(1, 2).reshape(b, s, self.h * self.d))
        return x


def test_a_buffer_mask_shared_by_layers_is_checked_once_per_step():
    # each check is a reduction and an assert kernel per step: one per layer cost the 4-layer
    # H200 step 3-5% over the op written by hand
    model = SharedBufferMask().eval()
    eager, compiled_model = model, copy.deepcopy(model)
    counters.clear()
    torch._dynamo.reset()
    graphs = {}
    step = torch.compile(compiled_model, backend=inspecting_backend(None, graphs), fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for p in (3, 4, 11):
            x, pos = torch.randn(2, 1, 64), torch.tensor([p])
            assert_close(step(x, pos), eager(x, pos), *TOL, what=f"position {p}")
    assert counters["graph_passes"]["sdpa_to_decode"] == 3
    asserts = [n for n in graphs["dynamo"].graph.nodes if "_assert_async" in str(n.target)]
    assert len(asserts) == 1, f"{len(asserts)} checks of the one mask"
    with torch.no_grad():  # the one check still guards every layer: a broken buffer raises
        compiled_model.causal_mask[12, 0] = False
        with pytest.raises(RuntimeError, match="not 'key j iff j <= position'"):
            step(torch.randn(2, 1, 64), torch.tensor([12]))
