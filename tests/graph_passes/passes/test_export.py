"""substitute_attention on torch.export programs: SDPA and hand-written forms, dynamic shapes,
options, GraphModule input, save/load and run_decompositions of the result."""

import expecttest
import pytest
import torch
from torch._dynamo.utils import counters

import attn_ops  # noqa: F401
from graph_passes import substitute_attention
from graph_passes.testing import graph_text
from tests.support.attention_models import HandAttention, SdpaAttention
from tests.support.helpers import TOLERANCES, assert_close

PREFILL = torch.ops.attn.prefill.default
TOL = TOLERANCES[torch.float32]


def _count(prog, target=PREFILL) -> int:
    return sum(1 for n in prog.graph.nodes if n.target is target)


def _export(model, b=2, s=9, dynamic=True):
    x = torch.randn(b, s, 64)
    shapes = ({0: torch.export.Dim("b", min=2, max=16), 1: torch.export.Dim("s", min=2, max=64)},)
    return torch.export.export(model, (x,), dynamic_shapes=shapes if dynamic else None)


@pytest.mark.parametrize("model", [
    SdpaAttention(gqa="repeat_kv"), SdpaAttention(gqa="sdpa", mask="triu_inf"),
    SdpaAttention(gqa="repeat_interleave", causal=False),
    HandAttention(style="hf"), HandAttention(style="llama", gqa="none", hkv=4),
    HandAttention(style="where", gqa="repeat_kv")], ids=lambda m: type(m).__name__)
def test_substituted_program_matches_eager_at_other_shapes(model):
    model = model.eval()
    ep = _export(model)
    counters.clear()
    new = substitute_attention(ep)
    assert _count(new) == 1, new.graph
    assert _count(ep) == 0, "the input program is left unchanged"
    with torch.no_grad():
        for b, s in ((2, 9), (3, 13), (5, 2)):
            x = torch.randn(b, s, 64)
            assert_close(new.module()(x), model(x), *TOL, what=f"{b}x{s}")


def test_gqa_is_folded_in_export():
    new = substitute_attention(_export(HandAttention(h=8, hkv=2, style="hf").eval()))
    (node,) = [n for n in new.graph.nodes if n.target is PREFILL]
    assert node.args[1].meta["val"].shape[1] == 2


def test_not_provable_mask_is_kept():
    model = HandAttention(style="nanogpt", mask="buffer").eval()
    new = substitute_attention(_export(model, dynamic=False))
    assert _count(new) == 0
    assert _count(new, torch.ops.aten.softmax.int) == 1


def test_options_and_graph_module_input():
    ep = _export(SdpaAttention().eval(), dynamic=False)
    assert _count(substitute_attention(ep, options={"sdpa": False})) == 0
    gm = substitute_attention(ep.graph_module)
    assert isinstance(gm, torch.fx.GraphModule) and _count(gm) == 1
    with pytest.raises(ValueError, match="ep_or_gm"):
        substitute_attention(object())
    with pytest.raises(ValueError, match="unknown substitution option"):
        substitute_attention(ep, options={"nope": True})


def test_save_load_and_decompose(tmp_path):
    model = HandAttention(style="hf").eval()
    new = substitute_attention(_export(model))
    path = tmp_path / "hand.pt2"
    torch.export.save(new, str(path))
    loaded = torch.export.load(str(path))
    decomposed = new.run_decompositions()
    assert _count(loaded) == 1 and _count(decomposed) == 1
    x = torch.randn(3, 11, 64)
    with torch.no_grad():
        ref = model(x)
        assert_close(loaded.module()(x), ref, *TOL, what="loaded")
        assert_close(decomposed.module()(x), ref, *TOL, what="decomposed")


class TestGoldens(expecttest.TestCase):
    def test_hf_eager_dynamic_export(self):
        ep = _export(HandAttention(style="hf").eval())
        keep = (lambda n: n.op == "call_function" and "linear" not in str(n.target))
        self.assertExpectedInline(graph_text(ep.graph, keep), """\
v0 = aten.sym_size.int(in5, 0)
v1 = aten.sym_size.int(in5, 1)
v3 = aten.view.default(v2, [v0, v1, 4, 16])
v4 = aten.transpose.int(v3, 1, 2)
v6 = aten.view.default(v5, [v0, v1, 2, 2, 16])
v7 = aten.permute.default(v6, [2, 0, 3, 1, 4])
v8 = aten.unbind.int(v7)
v9 = operator.getitem(v8, 0)
v10 = operator.getitem(v8, 1)
v11 = aten.unsqueeze.default(v9, 2)
v12 = aten.expand.default(v11, [v0, 2, 2, v1, 16])
v13 = aten.reshape.default(v12, [v0, 4, v1, 16])
v14 = aten.unsqueeze.default(v10, 2)
v15 = aten.expand.default(v14, [v0, 2, 2, v1, 16])
v16 = aten.reshape.default(v15, [v0, 4, v1, 16])
v17 = aten.arange.default(v1)
v18 = aten.unsqueeze.default(v17, 0)
v19 = aten.unsqueeze.default(v17, 1)
v20 = aten.le.Tensor(v18, v19)
v21 = aten.transpose.int(v13, 2, 3)
v22 = aten.matmul.default(v4, v21)
v23 = aten.mul.Tensor(v22, 0.25)
v24 = aten.where.Scalar(v20, 0, -3.403e+38)
v25 = aten._assert_tensor_metadata.default(v24, dtype=torch.float32)
v26 = aten.to.dtype(v24, torch.float32)
v27 = aten.add.Tensor(v23, v26)
v28 = aten.softmax.int(v27, -1, torch.float32)
v29 = aten._assert_tensor_metadata.default(v28, dtype=torch.float32)
v30 = aten.to.dtype(v28, torch.float32)
v31 = aten.dropout.default(v30, 0, False)
v32 = aten.matmul.default(v31, v16)
return (v32)""")
        self.assertExpectedInline(graph_text(substitute_attention(ep).graph, keep), """\
v0 = aten.sym_size.int(in5, 0)
v1 = aten.sym_size.int(in5, 1)
v3 = aten.view.default(v2, [v0, v1, 4, 16])
v4 = aten.transpose.int(v3, 1, 2)
v6 = aten.view.default(v5, [v0, v1, 2, 2, 16])
v7 = aten.permute.default(v6, [2, 0, 3, 1, 4])
v8 = aten.unbind.int(v7)
v9 = operator.getitem(v8, 0)
v10 = operator.getitem(v8, 1)
v11 = aten.sym_size.int(v4, 0)
v12 = operator.add(v11, 1)
v13 = aten.arange.default(v12, dtype=torch.int32)
v14 = aten.sym_size.int(v4, 2)
v15 = aten.mul.Tensor(v13, v14)
v16 = aten.sym_size.int(v9, 2)
v17 = aten.transpose.int(v4, 1, 2)
v18 = operator.mul(v11, v14)
v19 = aten.reshape.default(v17, [v18, 4, 16])
v20 = aten.transpose.int(v9, 1, 2)
v21 = operator.mul(v11, v16)
v22 = aten.reshape.default(v20, [v21, 2, 16])
v23 = aten.transpose.int(v10, 1, 2)
v24 = operator.mul(v11, v16)
v25 = aten.reshape.default(v23, [v24, 2, 16])
v26 = attn.prefill.default(v19, v22, v25, v15, v15, v14, v16, 0.25)
v27 = aten.view.default(v26, [v11, v14, 4, 16])
v28 = aten.transpose.int(v27, 1, 2)
return (v28)""")
