"""Hand-written attention over a static KV cache -> attn.decode / paged attn.prefill.

``softmax(q @ k_cache^T * scale [softcapped] + mask) @ v_cache`` in the ways models write it
(HF eager, Meta llama, masked_fill, torch.where; GQA by repeat_kv or repeat_interleave; Gemma2's
softcap), with the masks the SDPA pass takes over a cache, compared step by step with an eager
copy of the model (caches included, random values in unwritten slots). Also the masks that are
no "key j iff j <= position" (a slot past the written length, a random bool buffer, padding
lengths), left alone with their reason by both passes, and a gpt-fast-style model mixing both
SDPA GQA forms and the hand-written form through Inductor.
"""

import copy
import logging

import expecttest
import pytest
import torch
from torch._dynamo.utils import counters

import attn_ops  # noqa: F401
import graph_passes
from graph_passes.testing import graph_text, inspecting_backend
from tests.support.attention_models import CacheAttention, TinyGptFast
from tests.support.helpers import TOLERANCES, assert_close

aten = torch.ops.aten
DECODE = torch.ops.attn.decode.default
PREFILL = torch.ops.attn.prefill.default
TOL = TOLERANCES[torch.float32]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """CPU "auto" does not substitute (pure-torch backends are slower): choose the reference."""
    monkeypatch.setenv("ATTN_OPS_BACKEND", "reference")


def _steps(model, calls, options=None):
    """Run ``calls`` ((Sq, first position) each, after a 4-token prompt at 0..3 run eagerly in
    both copies) compiled and eagerly; return the compiled model's graphs. A ``lengths``
    argument goes along for the "lengths" mask."""
    eager, compiled_model = model.eval(), copy.deepcopy(model).eval()
    extra = (torch.tensor([9, 20]),) if model.mask == "lengths" else ()
    counters.clear()
    torch._dynamo.reset()
    graphs = {}
    step = torch.compile(compiled_model, backend=inspecting_backend(options, graphs),
                         fullgraph=True)
    with torch.no_grad():
        prompt, pos = torch.randn(2, 4, 64), torch.arange(4)
        eager(prompt, pos, *extra), compiled_model(prompt, pos, *extra)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for sq, start in calls:
                x, pos = torch.randn(2, sq, 64), torch.arange(start, start + sq)
                assert_close(step(x, pos, *extra), eager(x, pos, *extra), *TOL,
                             what=f"{sq} queries at {start}")
        assert torch.equal(compiled_model.k_cache, eager.k_cache), "the cache writes stay"
    return graphs


def _op_nodes(graphs, target):
    return [n for n in graphs["aten"].graph.nodes if n.target is target]


def _arg(node, index, name, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


DECODES = [  # attention, gqa, layout, mask, softcap
    ("hf", "repeat_kv", "heads_major", "arange", None),
    ("hf", "repeat_interleave", "token_major", "indexed_tril", None),
    ("llama", "repeat_interleave", "heads_major", "where_inf", None),
    ("masked_fill", "repeat_kv", "heads_major", "arange", None),
    ("where", "repeat_interleave", "heads_major", "buffer", None),
    ("where", "repeat_kv", "token_major", "window", None),
    ("hf", "repeat_kv", "heads_major", "additive", 0.5),
    ("llama", "repeat_interleave", "token_major", "additive_inf", 0.75),
]


@pytest.mark.parametrize("attention,gqa,layout,mask,softcap", DECODES)
def test_decode_steps(attention, gqa, layout, mask, softcap):
    """Every form: one attn.decode on the cache itself (Hkv heads), the positions as data (no
    recompile over positions 4, 5, 11, 23), the soft cap and window as the op's arguments."""
    model = CacheAttention(attention=attention, gqa=gqa, layout=layout, mask=mask,
                           softcap=softcap)
    graphs = _steps(model, [(1, 4), (1, 5), (1, 11), (1, 23)])
    assert counters["graph_passes"]["handwritten_to_decode"] == 1
    assert counters["graph_passes"]["handwritten_to_prefill_left_alone"] == 0
    (node,) = _op_nodes(graphs, DECODE)
    assert list(node.args[1].meta["val"].shape) == [2, 24, 2, 16], "the cache, not an expansion"
    assert _arg(node, 6, "window_left", -1) == (3 if mask == "window" else -1)
    assert _arg(node, 7, "softcap", 0.0) == (softcap or 0.0)
    assert not _op_nodes(graphs, aten.amax.default) and not _op_nodes(graphs, aten.bmm.default)
    assert not _op_nodes(graphs, torch.ops.graph_passes.attention_over_cache.default)


@pytest.mark.parametrize("attention,mask,softcap", [("hf", "arange", None),
                                                    ("where", "buffer", None),
                                                    ("llama", "additive", 0.5)])
def test_prefill_chunks(attention, mask, softcap):
    """Several queries at consecutive positions: a paged causal attn.prefill on the cache."""
    model = CacheAttention(attention=attention, gqa="repeat_kv", layout="heads_major",
                           mask=mask, softcap=softcap)
    graphs = _steps(model, [(5, 4), (5, 9), (5, 19)])
    assert counters["graph_passes"]["handwritten_over_cache_to_prefill"] == 1
    (node,) = _op_nodes(graphs, PREFILL)
    assert node.args[9] is not None, "read through a block table"
    assert _arg(node, 11, "softcap", 0.0) == (softcap or 0.0)


def test_a_buffer_mask_that_is_not_causal_raises():
    model = CacheAttention(attention="where", mask="buffer").eval()
    step = torch.compile(model, backend=inspecting_backend(), fullgraph=True)
    torch._dynamo.reset()
    with torch.no_grad():
        step(torch.randn(2, 1, 64), torch.tensor([5]))
        model.causal_mask.fill_(True)
        with pytest.raises(RuntimeError, match="read from a buffer is not"):
            step(torch.randn(2, 1, 64), torch.tensor([5]))


@pytest.mark.parametrize("mask_op", ["add", "masked_fill", "where"])
def test_the_placeholder_computes_the_attention_as_written(mask_op):
    """Never left in a graph, but should one run: softmax(q k^T * scale, capped, masked) v,
    GQA as repeat_interleave (a float64 reading for the oracle)."""
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 13, 16), torch.randn(2, 2, 13, 16)
    keep = torch.arange(13)[None, :] <= torch.tensor([4, 5, 12])[:, None]
    mask = {"add": torch.where(keep, 0.0, float("-inf")), "masked_fill": ~keep,
            "where": keep}[mask_op]
    out = torch.ops.graph_passes.attention_over_cache(q, k, v, mask, 0.3, 0.5, mask_op)
    s = q.double() @ k.double().repeat_interleave(2, 1).transpose(-2, -1) * 0.3
    s = (torch.tanh(s / 0.5) * 0.5).masked_fill(~keep, float("-inf"))
    expected = torch.softmax(s, -1) @ v.double().repeat_interleave(2, 1)
    assert_close(out, expected.float(), *TOL)


class TestGolden(expecttest.TestCase):
    def test_hf_decode_over_a_heads_major_cache(self):
        """HF eager by hand over gpt-fast's cache: the functional write (index_put), then
        attn.decode on its transposed view, key counts input_pos[0] + 1 on the device."""
        torch.manual_seed(0)
        model = CacheAttention(attention="hf", gqa="repeat_kv", layout="heads_major",
                               mask="arange")
        graphs = _steps(model, [(1, 6)])
        nodes = list(graphs["aten"].graph.nodes)
        first_write = next(i for i, n in enumerate(nodes) if n.target is aten.index_put.default)
        after = set(nodes[first_write:])  # the projections before it are not attention
        self.assertExpectedInline(graph_text(graphs["aten"], after.__contains__), """\
v15 = aten.index_put.default(in5, [None, None, in6], v14)
v16 = aten.permute.default(v13, [0, 2, 1, 3])
v17 = aten.index_put.default(in7, [None, None, in6], v16)
v18 = aten.view.default(in6, [-1])
v19 = aten.add.Tensor(v18, 1)
v20 = aten.clamp_min.default(v19, 0)
v21 = aten.clamp_max.default(v20, 24)
v22 = prims.convert_element_type.default(v21, torch.int32)
v23 = prims.iota.default(2, start=0, step=1, dtype=torch.int32, requires_grad=False)
v24 = aten.view.default(v23, [2, 1])
v25 = aten.permute.default(v15, [0, 2, 1, 3])
v26 = aten.permute.default(v17, [0, 2, 1, 3])
v27 = aten.select.int(v5, 2, 0)
v28 = aten.repeat.default(v22, [2])
v29 = attn.decode.default(v27, v25, v26, v28, v24, 0.25)
v30 = aten.unsqueeze.default(v29, 2)
v31 = aten.permute.default(v30, [0, 2, 1, 3])
v32 = aten.view.default(v31, [2, 1, 64])
return (v15, v17, v32)""")


# ---------------------------------------------------------------------------------------------
# Left alone: masks that are not "key j iff j <= position"
# ---------------------------------------------------------------------------------------------

NEGATIVE = {
    "one_past": "that is not j <= pos[i]",  # sees the next, unwritten slot
    "random_buffer": "depends on the input or attribute",  # data, not positions
    "lengths": "it reads",  # positions and per-sequence lengths: two inputs
}


@pytest.mark.parametrize("attention", ["sdpa", "hf"])
@pytest.mark.parametrize("mask", sorted(NEGATIVE))
def test_left_alone(attention, mask, caplog):
    model = CacheAttention(attention=attention, mask=mask, layout="heads_major")
    with caplog.at_level(logging.DEBUG, logger="graph_passes"):
        graphs = _steps(model, [(1, 4), (1, 7)])
    assert not _op_nodes(graphs, DECODE) and not _op_nodes(graphs, PREFILL)
    assert not [n for n in graphs["dynamo"].graph.nodes if "attn." in str(n.target)]
    name = "sdpa_to_prefill" if attention == "sdpa" else "handwritten_to_prefill"
    assert counters["graph_passes"][f"{name}_left_alone"] >= 1
    assert NEGATIVE[mask] in caplog.text


def test_softcap_without_a_cache_mask_says_so(caplog):
    """Soft-capped forms are substituted over a cache only (the dense op call has no softcap
    form in the table): the reason says it."""
    model = CacheAttention(attention="hf", mask="lengths", softcap=0.5)
    with caplog.at_level(logging.DEBUG, logger="graph_passes"):
        _steps(model, [(1, 4)])
    assert counters["graph_passes"]["handwritten_to_decode"] == 0
    assert "soft-capped hand-written attention is substituted over a cache only" in caplog.text


def test_option_turns_it_off():
    graphs = _steps(CacheAttention(attention="hf"), [(1, 4)], {"handwritten": False})
    assert not _op_nodes(graphs, DECODE)


def test_exported_decode_step():
    model = CacheAttention(attention="llama", gqa="repeat_kv", softcap=0.5).eval()
    eager = copy.deepcopy(model)
    x, pos = torch.randn(2, 1, 64), torch.tensor([6])
    counters.clear()
    program = graph_passes.substitute_attention(torch.export.export(model, (x, pos)))
    assert counters["graph_passes"]["handwritten_to_decode"] == 1
    assert [n.target for n in program.graph.nodes if "attn" in str(n.target)] == [DECODE]
    with torch.no_grad():
        assert_close(program.module()(x, pos), eager(x, pos), *TOL)


# ---------------------------------------------------------------------------------------------
# A gpt-fast-style model through Inductor: both SDPA GQA forms and the hand-written form
# ---------------------------------------------------------------------------------------------

MIXED = [dict(gqa="repeat_interleave"), dict(gqa="sdpa"),
         dict(attention="hf", gqa="repeat_kv"),
         dict(attention="llama", gqa="repeat_interleave", softcap=0.5)]


def test_gpt_fast_mixed_forms_with_inductor(fresh_compile):
    """torch.compile(backend="attn_ops", fullgraph=True): the prompt and every decode step of
    every layer on the ops (profiler events), the same tokens and logits as eager, one decode
    graph for every position (a recompile would raise)."""
    torch.manual_seed(0)
    model = TinyGptFast(layers=MIXED, layout="heads_major", mask="arange", s_max=16).eval()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="attn_ops", fullgraph=True)
    prompt, steps = torch.randint(0, 97, (1, 5)), 4

    def generate(step):
        """Greedy: the prompt, then one token per call; the logits of every call."""
        ids, pos, logits = prompt, torch.arange(5), []
        for p in range(5, 5 + steps + 1):
            logits.append(step(ids, pos))
            ids, pos = logits[-1][:, -1:].argmax(-1), torch.tensor([p])
        return logits
    with torch.no_grad():
        expected = generate(eager)
        for _ in range(2):  # compiles the prompt and decode graphs, then runs them again
            with torch._dynamo.config.patch(error_on_recompile=_ > 0), \
                    torch.profiler.profile() as prof:
                got = generate(compiled)
            for i, (a, e) in enumerate(zip(got, expected)):
                assert_close(a, e, *TOL, what=f"call {i}")
    names = [e.name for e in prof.events()]
    assert names.count("attn::prefill") == len(MIXED), "every layer of the prompt"
    assert names.count("attn::decode") == len(MIXED) * steps, "every layer of every step"
    assert not [n for n in names if "scaled_dot_product" in n]
    assert counters["graph_passes"]["sdpa_to_decode"] == 2
    assert counters["graph_passes"]["handwritten_to_decode"] == 2
    assert counters["graph_passes"]["sdpa_over_cache_to_prefill"] == 2
    assert counters["graph_passes"]["handwritten_over_cache_to_prefill"] == 2
    assert counters["stats"]["unique_graphs"] == 2, "one prompt graph, one decode graph"
