"""Hand-written attention -> attn.prefill (the joint-graph pattern pass): goldens, numerics,
the common forms (Hugging Face eager, Meta llama, nanoGPT, torch.where), what stays put.

Runs through ``graph_passes.testing.inspecting_backend`` (the aten graph Inductor would see,
executed eagerly); tests/graph_passes/test_compile_backend.py covers the real Inductor path.
"""

import logging

import expecttest
import pytest
import torch
from torch._dynamo.utils import counters

import attn_ops  # noqa: F401
from graph_passes.testing import graph_text, inspecting_backend
from tests.support.attention_models import HandAttention
from tests.support.helpers import TOLERANCES, assert_close

PREFILL = torch.ops.attn.prefill.default


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """CPU has only the reference backend, which "auto" does not substitute for (slower than
    what it replaces); these tests choose it explicitly, as a user would to force it."""
    monkeypatch.setenv("ATTN_OPS_BACKEND", "reference")


aten = torch.ops.aten


def _run(model, *inputs, dynamic=False, options=None, grad=False):
    counters.clear()
    torch._dynamo.reset()
    graphs = {}
    with torch.set_grad_enabled(grad):
        compiled = torch.compile(model, backend=inspecting_backend(options, graphs),
                                 dynamic=dynamic, fullgraph=True)
        torch.manual_seed(0)
        out = compiled(*inputs)
        torch.manual_seed(0)
        ref = model(*inputs)
    return out, ref, graphs


def _prefill_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is PREFILL]


def _attention_only(node) -> bool:
    return node.op == "call_function" and node.target not in (aten.addmm.default,
                                                              aten.permute.default)


class TestGoldens(expecttest.TestCase):
    def test_llama_div_triu_no_gqa(self):
        _, _, graphs = _run(HandAttention(style="llama", gqa="none", hkv=4).eval(),
                            torch.randn(1, 4, 64))
        self.assertExpectedInline(graph_text(graphs["aten_before"], _attention_only), """\
v0 = aten.view.default(in0, [4, 64])
v3 = aten.view.default(v2, [1, 4, 64])
v4 = aten.view.default(v3, [1, 4, 4, 16])
v6 = aten.view.default(in0, [4, 64])
v9 = aten.view.default(v8, [1, 4, 128])
v10 = aten.view.default(v9, [1, 4, 2, 4, 16])
v12 = aten.select.int(v11, 0, 0)
v13 = aten.select.int(v11, 0, 1)
v15 = aten.expand.default(v5, [1, 4, 4, 16])
v16 = aten.view.default(v15, [4, 4, 16])
v17 = aten.expand.default(v14, [1, 4, 16, 4])
v18 = aten.view.default(v17, [4, 16, 4])
v19 = aten.bmm.default(v16, v18)
v20 = aten.view.default(v19, [1, 4, 4, 4])
v21 = aten.div.Tensor(v20, 4)
v22 = aten.full.default([4, 4], -inf, dtype=torch.float32)
v23 = prims.iota.default(4, start=0, step=1, dtype=torch.int64, requires_grad=False)
v24 = aten.unsqueeze.default(v23, -2)
v25 = prims.iota.default(4, start=0, step=1, dtype=torch.int64, requires_grad=False)
v26 = aten.unsqueeze.default(v25, -1)
v27 = aten.sub.Tensor(v24, v26)
v28 = aten.ge.Scalar(v27, 1)
v29 = aten.scalar_tensor.default(0, dtype=torch.float32)
v30 = aten.where.self(v28, v22, v29)
v31 = aten.add.Tensor(v21, v30)
v32 = aten.amax.default(v31, [-1], True)
v33 = aten.sub.Tensor(v31, v32)
v34 = aten.exp.default(v33)
v35 = aten.sum.dim_IntList(v34, [-1], True)
v36 = aten.div.Tensor(v34, v35)
v37 = aten.expand.default(v36, [1, 4, 4, 4])
v38 = aten.view.default(v37, [4, 4, 4])
v39 = aten.expand.default(v13, [1, 4, 4, 16])
v40 = aten.view.default(v39, [4, 4, 16])
v41 = aten.bmm.default(v38, v40)
v42 = aten.view.default(v41, [1, 4, 4, 16])
return (v42)""")
        self.assertExpectedInline(graph_text(graphs["aten"], _attention_only), """\
v0 = aten.view.default(in0, [4, 64])
v3 = aten.view.default(v2, [1, 4, 64])
v4 = aten.view.default(v3, [1, 4, 4, 16])
v6 = aten.view.default(in0, [4, 64])
v9 = aten.view.default(v8, [1, 4, 128])
v10 = aten.view.default(v9, [1, 4, 2, 4, 16])
v12 = aten.select.int(v11, 0, 0)
v13 = aten.select.int(v11, 0, 1)
v14 = prims.iota.default(2, start=0, step=1, dtype=torch.int32, requires_grad=False)
v15 = aten.mul.Tensor(v14, 4)
v17 = aten.view.default(v16, [4, 4, 16])
v19 = aten.view.default(v18, [4, 4, 16])
v21 = aten.view.default(v20, [4, 4, 16])
v22 = attn.prefill.default(v17, v19, v21, v15, v15, 4, 4, 0.25)
v23 = aten.view.default(v22, [1, 4, 4, 16])
return (v24)""")

    def test_nanogpt_masked_fill_repeat_interleave(self):
        _, _, graphs = _run(HandAttention(style="nanogpt", gqa="repeat_interleave").eval(),
                            torch.randn(2, 4, 64))
        self.assertExpectedInline(graph_text(graphs["aten_before"], _attention_only), """\
v0 = aten.view.default(in0, [8, 64])
v3 = aten.view.default(v2, [2, 4, 64])
v4 = aten.view.default(v3, [2, 4, 4, 16])
v6 = aten.view.default(in0, [8, 64])
v9 = aten.view.default(v8, [2, 4, 64])
v10 = aten.view.default(v9, [2, 4, 2, 2, 16])
v12 = aten.select.int(v11, 0, 0)
v13 = aten.select.int(v11, 0, 1)
v14 = aten.unsqueeze.default(v12, 2)
v15 = aten.expand.default(v14, [2, 2, 2, 4, 16])
v16 = aten.clone.default(v15, memory_format=torch.contiguous_format)
v17 = aten.view.default(v16, [2, 4, 4, 16])
v18 = aten.unsqueeze.default(v13, 2)
v19 = aten.expand.default(v18, [2, 2, 2, 4, 16])
v20 = aten.clone.default(v19, memory_format=torch.contiguous_format)
v21 = aten.view.default(v20, [2, 4, 4, 16])
v22 = prims.iota.default(4, start=0, step=1, dtype=torch.int64, requires_grad=False)
v23 = aten.unsqueeze.default(v22, 0)
v24 = aten.unsqueeze.default(v22, 1)
v25 = aten.le.Tensor(v23, v24)
v27 = aten.expand.default(v5, [2, 4, 4, 16])
v28 = aten.clone.default(v27, memory_format=torch.contiguous_format)
v29 = aten.view.default(v28, [8, 4, 16])
v30 = aten.expand.default(v26, [2, 4, 16, 4])
v31 = aten.view.default(v30, [8, 16, 4])
v32 = aten.bmm.default(v29, v31)
v33 = aten.view.default(v32, [2, 4, 4, 4])
v34 = aten.mul.Tensor(v33, 0.25)
v35 = aten.eq.Scalar(v25, 0)
v36 = aten.scalar_tensor.default(-inf, dtype=torch.float32)
v37 = aten.where.self(v35, v36, v34)
v38 = aten.amax.default(v37, [-1], True)
v39 = aten.sub.Tensor(v37, v38)
v40 = aten.exp.default(v39)
v41 = aten.sum.dim_IntList(v40, [-1], True)
v42 = aten.div.Tensor(v40, v41)
v43 = aten.expand.default(v42, [2, 4, 4, 4])
v44 = aten.view.default(v43, [8, 4, 4])
v45 = aten.expand.default(v21, [2, 4, 4, 16])
v46 = aten.view.default(v45, [8, 4, 16])
v47 = aten.bmm.default(v44, v46)
v48 = aten.view.default(v47, [2, 4, 4, 16])
return (v48)""")
        self.assertExpectedInline(graph_text(graphs["aten"], _attention_only), """\
v0 = aten.view.default(in0, [8, 64])
v3 = aten.view.default(v2, [2, 4, 64])
v4 = aten.view.default(v3, [2, 4, 4, 16])
v6 = aten.view.default(in0, [8, 64])
v9 = aten.view.default(v8, [2, 4, 64])
v10 = aten.view.default(v9, [2, 4, 2, 2, 16])
v12 = aten.select.int(v11, 0, 0)
v13 = aten.select.int(v11, 0, 1)
v14 = prims.iota.default(3, start=0, step=1, dtype=torch.int32, requires_grad=False)
v15 = aten.mul.Tensor(v14, 4)
v17 = aten.view.default(v16, [8, 4, 16])
v19 = aten.view.default(v18, [8, 2, 16])
v21 = aten.view.default(v20, [8, 2, 16])
v22 = attn.prefill.default(v17, v19, v21, v15, v15, 4, 4, 0.25)
v23 = aten.view.default(v22, [2, 4, 4, 16])
return (v24)""")

    def test_hf_eager_repeat_kv(self):
        _, _, graphs = _run(HandAttention(style="hf").eval(), torch.randn(2, 4, 64))
        self.assertExpectedInline(graph_text(graphs["aten_before"], _attention_only), """\
v0 = aten.view.default(in0, [8, 64])
v3 = aten.view.default(v2, [2, 4, 64])
v4 = aten.view.default(v3, [2, 4, 4, 16])
v6 = aten.view.default(in0, [8, 64])
v9 = aten.view.default(v8, [2, 4, 64])
v10 = aten.view.default(v9, [2, 4, 2, 2, 16])
v12 = aten.select.int(v11, 0, 0)
v13 = aten.select.int(v11, 0, 1)
v14 = aten.unsqueeze.default(v12, 2)
v15 = aten.expand.default(v14, [2, 2, 2, 4, 16])
v16 = aten.clone.default(v15, memory_format=torch.contiguous_format)
v17 = aten.view.default(v16, [2, 4, 4, 16])
v18 = aten.unsqueeze.default(v13, 2)
v19 = aten.expand.default(v18, [2, 2, 2, 4, 16])
v20 = aten.clone.default(v19, memory_format=torch.contiguous_format)
v21 = aten.view.default(v20, [2, 4, 4, 16])
v22 = prims.iota.default(4, start=0, step=1, dtype=torch.int64, requires_grad=False)
v23 = aten.unsqueeze.default(v22, 0)
v24 = aten.unsqueeze.default(v22, 1)
v25 = aten.le.Tensor(v23, v24)
v27 = aten.expand.default(v5, [2, 4, 4, 16])
v28 = aten.clone.default(v27, memory_format=torch.contiguous_format)
v29 = aten.view.default(v28, [8, 4, 16])
v30 = aten.expand.default(v26, [2, 4, 16, 4])
v31 = aten.view.default(v30, [8, 16, 4])
v32 = aten.bmm.default(v29, v31)
v33 = aten.view.default(v32, [2, 4, 4, 4])
v34 = aten.mul.Tensor(v33, 0.25)
v35 = aten.scalar_tensor.default(-3.403e+38, dtype=torch.float32)
v36 = aten.scalar_tensor.default(0, dtype=torch.float32)
v37 = aten.where.self(v25, v36, v35)
v38 = aten.add.Tensor(v34, v37)
v39 = aten.amax.default(v38, [-1], True)
v40 = aten.sub.Tensor(v38, v39)
v41 = aten.exp.default(v40)
v42 = aten.sum.dim_IntList(v41, [-1], True)
v43 = aten.div.Tensor(v41, v42)
v44 = aten.clone.default(v43)
v45 = aten.expand.default(v44, [2, 4, 4, 4])
v46 = aten.view.default(v45, [8, 4, 4])
v47 = aten.expand.default(v21, [2, 4, 4, 16])
v48 = aten.view.default(v47, [8, 4, 16])
v49 = aten.bmm.default(v46, v48)
v50 = aten.view.default(v49, [2, 4, 4, 16])
return (v50)""")
        self.assertExpectedInline(graph_text(graphs["aten"], _attention_only), """\
v0 = aten.view.default(in0, [8, 64])
v3 = aten.view.default(v2, [2, 4, 64])
v4 = aten.view.default(v3, [2, 4, 4, 16])
v6 = aten.view.default(in0, [8, 64])
v9 = aten.view.default(v8, [2, 4, 64])
v10 = aten.view.default(v9, [2, 4, 2, 2, 16])
v12 = aten.select.int(v11, 0, 0)
v13 = aten.select.int(v11, 0, 1)
v14 = prims.iota.default(3, start=0, step=1, dtype=torch.int32, requires_grad=False)
v15 = aten.mul.Tensor(v14, 4)
v17 = aten.view.default(v16, [8, 4, 16])
v19 = aten.view.default(v18, [8, 2, 16])
v21 = aten.view.default(v20, [8, 2, 16])
v22 = attn.prefill.default(v17, v19, v21, v15, v15, 4, 4, 0.25)
v23 = aten.view.default(v22, [2, 4, 4, 16])
return (v24)""")


BF16 = torch.bfloat16


@pytest.mark.parametrize("style,gqa,mask,dtype", [
    ("hf", "repeat_kv", "graph", torch.float32), ("hf", "repeat_kv", "graph", BF16),
    ("hf", "none", "graph", torch.float32), ("llama", "repeat_kv", "graph", BF16),
    ("nanogpt", "repeat_interleave", "graph", torch.float32),
    ("where", "repeat_kv", "graph", torch.float32), ("nanogpt", "none", None, BF16)])
def test_substituted_matches_eager(style, gqa, mask, dtype):
    h, hkv = (6, 6) if gqa == "none" else (6, 2)
    model = HandAttention(h=h, hkv=hkv, d=32, style=style, gqa=gqa, mask=mask).eval().to(dtype)
    x = torch.randn(3, 13, 64, dtype=dtype)
    out, ref, graphs = _run(model, x)
    assert counters["graph_passes"]["handwritten_to_prefill"] == 1
    (node,) = _prefill_nodes(graphs["aten"])
    assert node.args[1].meta["val"].shape[1] == hkv, "GQA expansion folded: Hkv heads reach prefill"
    causal = node.args[8] if len(node.args) > 8 else node.kwargs.get("causal", True)
    assert causal is (mask is not None)
    assert not any(n.target is aten.amax.default for n in graphs["aten"].graph.nodes)
    assert_close(out, ref, *TOLERANCES[dtype])


def test_dynamic_shapes_one_graph_for_many_lengths():
    model = HandAttention(style="hf").eval()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=inspecting_backend(), dynamic=True, fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for b, s in ((2, 5), (3, 13), (4, 2), (5, 33), (2, 8)):  # 0 and 1 specialize
            x = torch.randn(b, s, 64)
            assert_close(compiled(x), model(x), *TOLERANCES[torch.float32], what=f"{b}x{s}")
    assert counters["graph_passes"]["handwritten_to_prefill"] == 1


@pytest.mark.parametrize("kwargs,extra,reason", [
    (dict(mask="buffer", style="nanogpt"), None, "depends on the input"),
    (dict(mask="input", style="where"), "mask", "depends on the input"),
    (dict(mask="window"), None, "not provably causal"),
    (dict(d=12), None, "head dim 12"),
])
def test_left_alone(kwargs, extra, reason, caplog):
    model = HandAttention(**kwargs).eval()
    x = torch.randn(2, 9, 64)
    args = (x,) if extra is None else (x, torch.ones(9, 9, dtype=torch.bool).tril())
    with caplog.at_level(logging.DEBUG, logger="graph_passes"):
        out, ref, graphs = _run(model, *args)
    assert counters["graph_passes"]["handwritten_to_prefill"] == 0
    assert not _prefill_nodes(graphs["aten"])
    assert reason in caplog.text
    assert "left the softmax" in caplog.text
    assert_close(out, ref, *TOLERANCES[torch.float32])


def test_dropout_in_training_is_left_alone():
    model = HandAttention(style="hf", dropout=0.5).train()
    out, _, graphs = _run(model, torch.randn(2, 9, 64))
    assert counters["graph_passes"]["handwritten_to_prefill"] == 0
    assert not _prefill_nodes(graphs["aten"])
    assert any(n.target is aten.amax.default for n in graphs["aten"].graph.nodes)
    assert out.isfinite().all()


def test_training_graph_is_left_alone(caplog):
    model = HandAttention(style="hf").train()
    with caplog.at_level(logging.DEBUG, logger="graph_passes"):
        counters.clear()
        torch._dynamo.reset()
        torch.compile(model, backend=inspecting_backend())(torch.randn(2, 5, 64)).sum().backward()
    assert counters["graph_passes"]["handwritten_to_prefill"] == 0
    assert "training graph" in caplog.text


def test_option_turns_the_pass_off():
    _, _, graphs = _run(HandAttention().eval(), torch.randn(2, 5, 64),
                        options={"handwritten": False})
    assert counters["graph_passes"]["handwritten_to_prefill"] == 0
    assert not _prefill_nodes(graphs["aten"])
