"""SDPA -> attn.prefill (the pre-grad pass): goldens, numerics against eager, what stays put.

Runs through ``graph_passes.testing.inspecting_backend`` (our passes where Inductor runs them,
executed eagerly), so each case compiles in well under a second;
tests/graph_passes/test_compile_backend.py covers the real Inductor path.
"""

import logging
import re

import expecttest
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import attn_ops  # noqa: F401
from graph_passes.testing import graph_text, inspecting_backend
from tests.support.attention_models import SdpaAttention
from tests.support.helpers import TOLERANCES, assert_close

PREFILL = torch.ops.attn.prefill.default


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """The tests run on the reference (the oracle), chosen explicitly as a user would; "auto"
    on the CPU would choose the sdpa backend (tested below)."""
    monkeypatch.setenv("ATTN_OPS_BACKEND", "reference")


def _run(model, *inputs, dynamic=False, options=None):
    counters.clear()
    torch._dynamo.reset()
    graphs = {}
    with torch.no_grad():
        compiled = torch.compile(model, backend=inspecting_backend(options, graphs),
                                 dynamic=dynamic, fullgraph=True)
        out, ref = compiled(*inputs), model(*inputs)
    return out, ref, graphs


def _prefill_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is PREFILL]


def _causal(node) -> bool:
    """The causal argument of a prefill node (tracers drop it when it is the default, True)."""
    return node.args[8] if len(node.args) > 8 else node.kwargs.get("causal", True)


def _attention_only(node) -> bool:
    return node.op in ("call_function", "call_method") and "linear" not in str(node.target)


class TestGoldens(expecttest.TestCase):
    def _graphs(self, model, dynamic):
        counters.clear()
        torch._dynamo.reset()
        graphs = {}
        with torch.no_grad():
            torch.compile(model, backend=inspecting_backend(None, graphs), fullgraph=True,
                          dynamic=dynamic)(torch.randn(2, 5, 64))
        return (graph_text(graphs["dynamo_before"], _attention_only),
                graph_text(graphs["dynamo"], _attention_only))

    def test_repeat_kv_is_causal_static(self):
        before, after = self._graphs(SdpaAttention(gqa="repeat_kv").eval(), dynamic=False)
        self.assertExpectedInline(before, """\
v0 = operator.getitem(in0, (None:None, 0:None))
v2 = .view(v1, 2, 5, 4, 16)
v3 = .transpose(v2, 1, 2)
v5 = .view(v4, 2, 5, 2, 2, 16)
v6 = .permute(v5, 2, 0, 3, 1, 4)
v7 = operator.getitem(v6, 0)
v8 = operator.getitem(v6, 1)
v9 = operator.getitem(v7, (None:None, None:None, None))
v10 = .expand(v9, 2, 2, 2, 5, 16)
v11 = .reshape(v10, 2, 4, 5, 16)
v12 = operator.getitem(v8, (None:None, None:None, None))
v13 = .expand(v12, 2, 2, 2, 5, 16)
v14 = .reshape(v13, 2, 4, 5, 16)
v15 = torch.scaled_dot_product_attention(v3, v11, v14, is_causal=True, dropout_p=0, scale=None, enable_gqa=False)
return (v15)""")
        self.assertExpectedInline(after, """\
v0 = operator.getitem(in0, (None:None, 0:None))
v2 = .view(v1, 2, 5, 4, 16)
v3 = .transpose(v2, 1, 2)
v5 = .view(v4, 2, 5, 2, 2, 16)
v6 = .permute(v5, 2, 0, 3, 1, 4)
v7 = operator.getitem(v6, 0)
v8 = operator.getitem(v6, 1)
v9 = aten.arange.default(3, dtype=torch.int32)
v10 = aten.mul.Tensor(v9, 5)
v11 = aten.transpose.int(v3, 1, 2)
v12 = aten.reshape.default(v11, [10, 4, 16])
v13 = aten.transpose.int(v7, 1, 2)
v14 = aten.reshape.default(v13, [10, 2, 16])
v15 = aten.transpose.int(v8, 1, 2)
v16 = aten.reshape.default(v15, [10, 2, 16])
v17 = attn.prefill.default(v12, v14, v16, v10, v10, 5, 5, 0.25, True)
v18 = aten.view.default(v17, [2, 5, 4, 16])
v19 = aten.transpose.int(v18, 1, 2)
return (v19)""")

    def test_enable_gqa_tril_mask_dynamic(self):
        before, after = self._graphs(SdpaAttention(gqa="sdpa", mask="tril").eval(), dynamic=True)
        self.assertExpectedInline(before, """\
v0 = operator.sub(in1, in1)
v1 = operator.getitem(in2, (None:None, v0:None))
v3 = .view(v2, in0, in1, 4, 16)
v4 = .transpose(v3, 1, 2)
v6 = .view(v5, in0, in1, 2, 2, 16)
v7 = .permute(v6, 2, 0, 3, 1, 4)
v8 = operator.getitem(v7, 0)
v9 = operator.getitem(v7, 1)
v10 = torch.ones(in1, in1, dtype=torch.bool)
v11 = .tril(v10)
v12 = torch.scaled_dot_product_attention(v4, v8, v9, attn_mask=v11, dropout_p=0, scale=None, enable_gqa=True)
return (v12)""")
        self.assertExpectedInline(after, """\
v0 = operator.sub(in1, in1)
v1 = operator.getitem(in2, (None:None, v0:None))
v3 = .view(v2, in0, in1, 4, 16)
v4 = .transpose(v3, 1, 2)
v6 = .view(v5, in0, in1, 2, 2, 16)
v7 = .permute(v6, 2, 0, 3, 1, 4)
v8 = operator.getitem(v7, 0)
v9 = operator.getitem(v7, 1)
v10 = aten.sym_size.int(v4, 0)
v11 = aten.sym_size.int(v4, 2)
v12 = operator.add(v10, 1)
v13 = aten.arange.default(v12, dtype=torch.int32)
v14 = aten.mul.Tensor(v13, v11)
v15 = aten.transpose.int(v4, 1, 2)
v16 = operator.mul(v10, v11)
v17 = aten.reshape.default(v15, [v16, 4, 16])
v18 = aten.transpose.int(v8, 1, 2)
v19 = aten.reshape.default(v18, [v16, 2, 16])
v20 = aten.transpose.int(v9, 1, 2)
v21 = aten.reshape.default(v20, [v16, 2, 16])
v22 = attn.prefill.default(v17, v19, v21, v14, v14, v11, v11, 0.25, True)
v23 = aten.view.default(v22, [v10, v11, 4, 16])
v24 = aten.transpose.int(v23, 1, 2)
return (v24)""")


BF16 = torch.bfloat16


@pytest.mark.parametrize("gqa,mask,causal,dtype", [
    ("repeat_kv", None, True, torch.float32), ("repeat_kv", None, True, BF16),
    ("repeat_interleave", "tril", True, torch.float32), ("sdpa", "triu_inf", True, BF16),
    ("none", "arange", True, torch.float32), ("sdpa", None, False, torch.float32),
    ("repeat_kv", None, False, BF16), ("repeat_kv", "truncated", True, torch.float32),
    ("repeat_kv", "window", True, torch.float32)])
def test_substituted_matches_eager(gqa, mask, causal, dtype):
    h, hkv = (6, 6) if gqa == "none" else (6, 2)
    model = SdpaAttention(h=h, hkv=hkv, d=32, gqa=gqa, mask=mask, causal=causal).eval().to(dtype)
    x = torch.randn(3, 13, 64, dtype=dtype)
    out, ref, graphs = _run(model, x)
    assert counters["graph_passes"]["sdpa_to_prefill"] == 1
    (node,) = _prefill_nodes(graphs["aten"])
    assert node.args[1].meta["val"].shape[1] == hkv, "GQA expansion folded: Hkv heads reach prefill"
    assert _causal(node) is causal
    window_left = node.args[10] if len(node.args) > 10 else node.kwargs.get("window_left", -1)
    assert window_left == (3 if mask == "window" else -1), "(j <= i) & (i - j < 4): 3 back"
    assert_close(out, ref, *TOLERANCES[dtype])


def test_fewer_queries_than_keys_is_substituted_when_not_causal():
    model = SdpaAttention(gqa="sdpa", causal=False, q_len=7).eval()
    x = torch.randn(2, 11, 64)
    out, ref, graphs = _run(model, x)
    assert counters["graph_passes"]["sdpa_to_prefill"] == 1
    assert_close(out, ref, *TOLERANCES[torch.float32])


def test_dynamic_shapes_one_graph_for_many_lengths():
    model = SdpaAttention(gqa="repeat_kv").eval()
    torch._dynamo.reset()
    counters.clear()
    backend = inspecting_backend()
    compiled = torch.compile(model, backend=backend, dynamic=True, fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for b, s in ((2, 5), (3, 13), (4, 2), (5, 33), (2, 8)):  # 0 and 1 specialize
            x = torch.randn(b, s, 64)
            assert_close(compiled(x), model(x), *TOLERANCES[torch.float32], what=f"{b}x{s}")
    assert counters["graph_passes"]["sdpa_to_prefill"] == 1


@pytest.mark.parametrize("kwargs,extra,reason", [
    (dict(dropout=0.1, gqa="sdpa"), None, "dropout_p"),
    (dict(mask="input"), "mask", "not provably causal"),
    (dict(mask="padding"), "lengths", "not provably causal"),
    (dict(mask="window_with_a_hole"), None, "not provably causal"),
    (dict(mask="fp32_tie"), None, "hides every key"),
    (dict(gqa="sdpa", q_len=7), None, "Sq=7 and Sk=9 not provably equal"),
    (dict(gqa="sdpa", kv_len=7, causal=False), None, "may exceed"),
    (dict(gqa="sdpa", d=12), None, "head dim 12"),
])
def test_left_alone(kwargs, extra, reason, caplog):
    model = SdpaAttention(**kwargs).eval()
    x = torch.randn(2, 9, 64)
    args = (x,)
    if extra == "mask":
        args = (x, torch.randn(9, 9))
    elif extra == "lengths":
        args = (x, torch.tensor([9, 4]))
    with caplog.at_level(logging.DEBUG, logger="graph_passes"):
        torch.manual_seed(1)
        out, _, graphs = _run(model, *args)
    assert counters["graph_passes"]["sdpa_to_prefill"] == 0
    assert counters["graph_passes"]["sdpa_to_prefill_left_alone"] == 1
    assert not _prefill_nodes(graphs["aten"])
    assert reason in caplog.text
    if not kwargs.get("dropout"):
        with torch.no_grad():
            assert_close(out, model(*args), *TOLERANCES[torch.float32])


def test_left_alone_when_the_head_dim_is_strided(caplog):
    def f(x):
        q = x.transpose(-1, -2)  # [B, H, S, D] with stride(-1) == S
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)
    x = torch.randn(2, 4, 16, 8)
    with caplog.at_level(logging.DEBUG, logger="graph_passes"):
        out, ref, _ = _run(f, x)
    assert counters["graph_passes"]["sdpa_to_prefill"] == 0
    assert "not contiguous" in caplog.text
    assert_close(out, ref, *TOLERANCES[torch.float32])


def test_left_alone_when_gradients_are_needed(caplog):
    model = SdpaAttention().train()
    with caplog.at_level(logging.DEBUG, logger="graph_passes"):
        counters.clear()
        torch._dynamo.reset()
        torch.compile(model, backend=inspecting_backend())(torch.randn(2, 5, 64)).sum().backward()
    assert counters["graph_passes"]["sdpa_to_prefill"] == 0
    assert "inference-only" in caplog.text


def test_left_alone_for_a_backend_that_cannot_run_it(caplog):
    model = SdpaAttention().eval()
    with caplog.at_level(logging.DEBUG, logger="graph_passes"):
        _run(model, torch.randn(2, 5, 64), options={"attn_backend": "flash"})
    assert counters["graph_passes"]["sdpa_to_prefill"] == 0
    assert "attn backend 'flash'" in caplog.text


def test_options_turn_the_pass_off():
    _, _, graphs = _run(SdpaAttention().eval(), torch.randn(2, 5, 64), options={"sdpa": False})
    assert counters["graph_passes"]["sdpa_to_prefill"] == 0 and not _prefill_nodes(graphs["aten"])
    _, _, graphs = _run(SdpaAttention(mask="tril").eval(), torch.randn(2, 5, 64),
                        options={"tensor_masks": False})
    assert counters["graph_passes"]["sdpa_to_prefill"] == 0


def test_without_gqa_folding_the_expanded_heads_reach_prefill():
    _, _, graphs = _run(SdpaAttention(gqa="repeat_kv").eval(), torch.randn(2, 5, 64),
                        options={"fold_gqa": False})
    (node,) = _prefill_nodes(graphs["aten"])
    assert node.args[1].meta["val"].shape[1] == 4


def test_auto_substitutes_a_large_enough_cpu_prefill_on_sdpa(monkeypatch, caplog):
    # The sdpa backend runs a dense cache-free prefill on views with PyTorch's fused CPU kernel,
    # no slower than Inductor's own SDPA once the attention outweighs the op's fixed host cost
    # (eligibility.CPU_MIN_WORK): "auto" substitutes from there on, and leaves smaller ones.
    from graph_passes.rewrite import eligibility
    monkeypatch.delenv("ATTN_OPS_BACKEND")
    model, x = SdpaAttention(gqa="sdpa").eval(), torch.randn(2, 5, 64)  # 2*4*5*5*16 = 3200
    with caplog.at_level(logging.DEBUG, logger="graph_passes"):
        out, ref, graphs = _run(model, x)
    assert counters["graph_passes"]["sdpa_to_prefill"] == 0 and not _prefill_nodes(graphs["aten"])
    assert "too small (3200 multiply-adds of q k^T < 67108864)" in caplog.text
    monkeypatch.setattr(eligibility, "CPU_MIN_WORK", 3200)
    out, ref, graphs = _run(model, x)
    assert counters["graph_passes"]["sdpa_to_prefill"] == 1 and _prefill_nodes(graphs["aten"])
    assert_close(out, ref, *TOLERANCES[torch.float32])
    # Below the size gate again: an explicit choice, or only_if_faster off, substitutes whatever
    # the size
    monkeypatch.setattr(eligibility, "CPU_MIN_WORK", 3201)
    _run(model, x, options={"attn_backend": "sdpa"})
    assert counters["graph_passes"]["sdpa_to_prefill"] == 1
    _run(model, x, options={"only_if_faster": False})
    assert counters["graph_passes"]["sdpa_to_prefill"] == 1
    _run(model, x)  # and "auto" leaves it alone there
    assert counters["graph_passes"]["sdpa_to_prefill"] == 0


@pytest.mark.parametrize("config,reason", [
    (dict(op="prefill"), None),
    (dict(op="prefill", paged=True, block_size=16), "only a pure-torch backend (sdpa)"),
    (dict(op="decode", paged=True, block_size=16), "only a pure-torch backend (sdpa)"),
    (dict(op="prefill", softcap=5.0), "only a pure-torch backend (reference)"),
    (dict(op="prefill", device=torch.device("meta")), "only a pure-torch backend (sdpa)"),
])
def test_auto_on_cpu_substitutes_only_where_a_pure_torch_backend_wins(config, reason):
    from attn_ops.contract import OpConfig
    from graph_passes.rewrite.eligibility import backend_reason
    cfg = OpConfig(**{"device": torch.device("cpu"), "dtype": torch.float32, "head_dim": 64,
                      "num_kv_heads": 2, "num_heads": 4, **config})
    got = backend_reason(cfg, "auto")
    assert got is None if reason is None else reason in got, got
    assert backend_reason(cfg, "auto", only_if_faster=False) is None


def test_inductor_passes_views_to_the_op_and_adds_no_copy():
    """Under Inductor (CPU, sdpa backend) the op reads q, k, v where their producers wrote them
    and its output feeds the output projection directly: the generated code has the same
    kernels as Inductor's own SDPA version and only views around the op."""
    from torch._inductor.utils import run_and_get_code

    model = SdpaAttention(h=4, hkv=2, d=16, gqa="sdpa").eval()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.o = model, torch.nn.Linear(64, 64, bias=False)

        def forward(self, x):
            b, s, _ = x.shape
            return self.o(self.attn(x).transpose(1, 2).reshape(b, s, 64))

    block, x = Block().eval(), torch.randn(2, 9, 64)
    codes = {}
    with torch.no_grad():
        for name, kw in (("inductor", {}), ("attn_ops", {
                "backend": "attn_ops", "options": {"attn_ops.attn_backend": "sdpa"}})):
            torch._dynamo.reset()
            out, (code, *_) = run_and_get_code(torch.compile(block, **kw), x)
            assert_close(out, block(x), *TOLERANCES[torch.float32], what=name)
            codes[name] = code
    code = codes["attn_ops"]
    call = next(line for line in code.splitlines() if "torch.ops.attn.prefill.default(" in line)
    # q, k, v: reinterpret_tensor views of buffers their producers wrote (no clone between).
    assert call.count("reinterpret_tensor(") >= 3, call
    for copy in ("clone", ".contiguous(", "copy_", "as_strided_scatter"):
        assert copy not in code, copy

    def kernels(text):
        return re.findall(r"^ *(cpp_fused_\w+)\(([^)]*)\)", text, re.M)
    # cu_seqlens (arange(B + 1) * S, int32) come from a small kernel of their own unless
    # Inductor fuses them into a producer's; every other kernel is one Inductor's own SDPA
    # version has too: none copies q, k, v or the output.
    cu_args = set(re.findall(r"(buf\d+)", call.split("),")[-1])[:2])
    ours = [k for k, args in kernels(code) if not set(args.replace(" ", "").split(",")) <= cu_args]
    assert len(ours) == len(kernels(codes["inductor"])), (kernels(code), kernels(codes["inductor"]))
