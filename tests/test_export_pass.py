"""substitute_attention on torch.export programs: SDPA and hand-written forms, dynamic shapes,
options, GraphModule input, save/load and run_decompositions of the result."""

import pytest
import torch
from torch._dynamo.utils import counters

import attn_ops  # noqa: F401
from graph_passes import substitute_attention
from tests.helpers import TOLERANCES, assert_close
from tests.test_graph_passes_handwritten import HandAttention
from tests.test_graph_passes_sdpa import SdpaAttention

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
