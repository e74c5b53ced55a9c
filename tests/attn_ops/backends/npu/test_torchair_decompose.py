"""The torchair decomposition pass: FX graphs in, visible torch.ops.npu calls out.

torchair itself cannot be installed here, so the pass is checked on FX graphs (golden of the
rewritten nodes), by value through the CPU emulator of the torch_npu ops, and end to end under
``torch.compile`` with AOTAutograd standing in for torchair's compiler: the length inputs must
survive AOTAutograd as graph placeholders, which is the condition torchair's reduce-overhead
mode needs to refresh FIA's lengths at each replay.
"""

from __future__ import annotations

import pytest
import torch
from expecttest import TestCase
from torch._functorch.aot_autograd import aot_module_simplified
from torch.fx.experimental.proxy_tensor import make_fx

import attn_ops  # noqa: F401  (registers torch.ops.attn)
from tests.support import npu_emulator as emu
from attn_ops.backends import reference
from attn_ops.backends.npu.torchair_decompose import (COUNTER, DecomposeError,
                                                     decompose_attn_ops, decomposing_backend)
from tests.support.helpers import (TOLERANCES, assert_close, cu_seqlens,
                                   loaded_in_a_fresh_interpreter, random_paged)

EMULATED = emu.install()
pytestmark = pytest.mark.skipif(not EMULATED, reason="a real torch_npu is loaded; these tests "
                                                     "drive the CPU emulator of its ops")
BF16 = torch.bfloat16


def decode_step(q, key, value, k_cache, v_cache, slots, seqlens_k, block_table):
    torch.ops.attn.store_kvcache(key, value, k_cache, v_cache, slots)
    return torch.ops.attn.decode(q, k_cache, v_cache, seqlens_k, block_table, 0.125)


def paged_prefill(q, k_cache, v_cache, cu_q, cu_k, block_table):
    return torch.ops.attn.prefill(q, k_cache, v_cache, cu_q, cu_k, 64, 200, 0.1, True,
                                  block_table)


def _decode_batch(lens, h=4, hkv=2, d=64, block_size=16, width=4, num_blocks=16):
    """A decode step: per row, the new token goes to slot lens-1 (or -1 for a padded row).

    The caches always have ``num_blocks`` blocks, so steps of one batch size share shapes."""
    cached = [max(n - 1, 0) for n in lens]
    spare_blocks = num_blocks - sum(-(-n // block_size) for n in cached)
    pb = random_paged(cached, hkv, d, block_size, BF16, spare_blocks=spare_blocks,
                      table_width=width)
    table = pb.block_table.clone()
    spare = iter(range(num_blocks - spare_blocks, num_blocks))
    slots = []
    for b, n in enumerate(lens):
        if n == 0:
            slots.append(-1)
            continue
        col = (n - 1) // block_size
        if (n - 1) % block_size == 0:
            table[b, col] = next(spare)  # the new token opens a fresh block
        slots.append(int(table[b, col]) * block_size + (n - 1) % block_size)
    key = torch.randn(len(lens), hkv, d, dtype=BF16)
    return (torch.randn(len(lens), h, d, dtype=BF16), key, torch.randn_like(key), pb.k_cache,
            pb.v_cache, torch.tensor(slots), torch.tensor(lens, dtype=torch.int32), table)


def _reference_step(args):
    q, key, value, kc, vc, slots, seqlens, table = args
    kc, vc = kc.clone(), vc.clone()
    reference.store_kvcache(key, value, kc, vc, slots)
    return reference.decode(q, kc, vc, seqlens, table, 0.125), kc


def _summary(gm) -> str:
    """Placeholders and the torch_npu nodes of a graph, one per line, argument names normalised."""
    lines = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            lines.append(f"input {node.name}")
        elif node.op == "call_function" and str(node.target).split(".")[0] in ("npu", "atb"):
            kwargs = ", ".join(f"{k}={v}" for k, v in node.kwargs.items())
            lines.append(f"{node.target}({', '.join(map(str, node.args))}; {kwargs})")
    return "\n".join(lines)


class TestDecomposeGraph(TestCase):
    def test_decode_step_graph(self):
        args = _decode_batch([5, 0, 17])
        gm = make_fx(decode_step, tracing_mode="fake")(*args)
        before = torch._dynamo.utils.counters[COUNTER]["decode"]
        result = decompose_attn_ops(gm)
        self.assertEqual(result.replaced, {"store_kvcache": 1, "decode": 1})
        self.assertEqual(torch._dynamo.utils.counters[COUNTER]["decode"], before + 1)
        self.assertExpectedInline(_summary(result.graph_module), """\
input q_1
input key_1
input value_1
input k_cache_1
input v_cache_1
input slots_1
input seqlens_k_1
input block_table_1
input attn_npu_seqlens_seqlens_k_1_0
input attn_npu_seqlens_seqlens_k_1_1
input attn_npu_seqlens_seqlens_k_1_2
npu.npu_scatter_pa_kv_cache.default(where_3, where_5, k_cache_1, v_cache_1, where_1; cache_mode=Norm)
npu.npu_fused_infer_attention_score_v2.default(unsqueeze, flatten_2, flatten_3; actual_seq_kvlen=[attn_npu_seqlens_seqlens_k_1_0, attn_npu_seqlens_seqlens_k_1_1, attn_npu_seqlens_seqlens_k_1_2], block_table=to_2, num_query_heads=4, num_key_value_heads=2, softmax_scale=0.125, input_layout=BNSD, block_size=16)""")  # noqa: E501
        self.assertFalse(any("attn." in str(n.target) for n in result.graph_module.graph.nodes))

    def test_prefill_graph_shares_lengths_between_layers(self):
        lens_q, lens_k = [3, 60], [130, 200]
        pb = random_paged(lens_k, 2, 128, 128, BF16)
        q = torch.randn(sum(lens_q), 8, 128, dtype=BF16)
        args = (q, pb.k_cache, pb.v_cache, cu_seqlens(lens_q), cu_seqlens(lens_k), pb.block_table)

        def two_layers(q, kc, vc, cu_q, cu_k, table):
            return paged_prefill(paged_prefill(q, kc, vc, cu_q, cu_k, table), kc, vc, cu_q,
                                 cu_k, table)

        result = decompose_attn_ops(make_fx(two_layers, tracing_mode="fake")(*args))
        self.assertEqual(result.replaced, {"prefill": 2})
        self.assertEqual(result.num_extra_inputs, 4)  # one set of lengths for both layers
        self.assertEqual(result.host_lengths(args), [3, 63, 130, 200])  # cumulative q, per-req kv
        out = result.graph_module(*args, *result.host_lengths(args))
        mid = reference.prefill(q, pb.k_cache, pb.v_cache, *args[3:5], 64, 200, 0.1, True,
                                pb.block_table)
        ref = reference.prefill(mid, pb.k_cache, pb.v_cache, *args[3:5], 64, 200, 0.1, True,
                                pb.block_table)
        assert_close(out, ref, 3e-2, 3e-2)  # two bf16 layers
        fia = [n for n in result.graph_module.graph.nodes if "fused_infer" in str(n.target)]
        self.assertEqual([n.kwargs["sparse_mode"] for n in fia], [3, 3])
        self.assertEqual(fia[0].kwargs["actual_seq_qlen"], fia[1].kwargs["actual_seq_qlen"])


@pytest.mark.parametrize("lens", [[5, 0, 17, 1], [16, 33, 0, 0], [1, 2, 3, 4]])
def test_decomposed_decode_step_matches_reference(lens):
    args = _decode_batch(lens)
    result = decompose_attn_ops(make_fx(decode_step, tracing_mode="fake")(*args))
    kc = args[3].clone()
    run_args = (*args[:3], kc, args[4].clone(), *args[5:])
    with emu.recording() as calls:
        out = result.graph_module(*run_args, *result.host_lengths(run_args))
    ref, ref_kc = _reference_step(args)
    assert_close(out, ref, *TOLERANCES[BF16])
    assert torch.equal(kc, ref_kc)
    assert [c["op"] for c in calls] == ["npu_scatter_pa_kv_cache",
                                        "npu_fused_infer_attention_score_v2"]
    assert calls[1]["kwargs"]["actual_seq_kvlen"] == lens


@pytest.mark.parametrize("paged", [False, True])
def test_padded_prefill_tail_fails_loudly_in_graph_mode(paged):
    lens = [5, 7]
    q = torch.randn(sum(lens) + 2, 4, 128, dtype=BF16)  # two padding rows
    cu = cu_seqlens(lens)
    if paged:
        pb = random_paged(lens, 2, 128, 128, BF16)
        fn = lambda q, kc, vc, cu, t: torch.ops.attn.prefill(  # noqa: E731
            q, kc, vc, cu, cu, 7, 7, 0.1, True, t)
        args = (q, pb.k_cache, pb.v_cache, cu, pb.block_table)
    else:
        k = torch.randn(sum(lens), 2, 128, dtype=BF16)
        fn = lambda q, k, v, cu: torch.ops.attn.prefill(q, k, v, cu, cu, 7, 7, 0.1)  # noqa
        args = (q, k, k, cu)
    result = decompose_attn_ops(make_fx(fn, tracing_mode="fake")(*args))
    with pytest.raises(emu.EmulatorError, match="must end at the token count"):
        result.graph_module(*args, *result.host_lengths(args))


def test_pass_refuses_lengths_computed_in_graph():
    def fn(q, kc, vc, table):
        seqlens = torch.full((q.shape[0],), 3, dtype=torch.int32)
        return torch.ops.attn.decode(q, kc, vc, seqlens, table, 0.1)

    args = _decode_batch([3, 3])
    gm = make_fx(fn, tracing_mode="fake")(args[0], args[3], args[4], args[7])
    with pytest.raises(DecomposeError, match="computed inside the graph"):
        decompose_attn_ops(gm)


def test_pass_refuses_a_dynamic_batch():
    args = _decode_batch([3, 4])
    gm = make_fx(decode_step, tracing_mode="symbolic")(*args)
    with pytest.raises(DecomposeError, match="must be static"):
        decompose_attn_ops(gm)


def test_pass_propagates_what_fia_cannot_do():
    fn = lambda q, kc, vc, s, t: torch.ops.attn.decode(q, kc, vc, s, t, 0.1, 4)  # noqa: E731
    args = _decode_batch([3, 4])
    gm = make_fx(fn, tracing_mode="fake")(args[0], args[3], args[4], args[6], args[7])
    with pytest.raises(ValueError, match="window_left"):
        decompose_attn_ops(gm)


def test_compiled_decode_replays_with_new_lengths_without_recompiling():
    graphs, example_inputs = [], []

    def fw_compiler(gm, inputs):
        graphs.append(gm)
        return gm.forward

    def torchair_stand_in(gm, inputs):  # what torchair does first: AOTAutograd over the graph
        example_inputs.append(inputs)
        return aot_module_simplified(gm, inputs, fw_compiler=fw_compiler)

    torch._dynamo.reset()
    step = torch.compile(decode_step, backend=decomposing_backend(torchair_stand_in),
                         dynamic=False, fullgraph=True)
    for lens in ([5, 0, 17], [6, 0, 18], [16, 1, 2]):
        args = _decode_batch(lens)
        kc = args[3].clone()
        with torch.no_grad():
            out = step(*args[:3], kc, args[4].clone(), *args[5:])
        ref, ref_kc = _reference_step(args)
        assert_close(out, ref, *TOLERANCES[BF16])
        assert torch.equal(kc, ref_kc)
    assert len(graphs) == 1  # one compile serves every length
    assert all(isinstance(x, torch.SymInt) for x in example_inputs[0][-3:])
    # torchair's reduce-overhead refreshes an FIA length at replay only if it is a graph input:
    (fia,) = [n for n in graphs[0].graph.nodes if "fused_infer" in str(n.target)]
    assert all(n.op == "placeholder" for n in fia.kwargs["actual_seq_kvlen"])
    assert len(fia.kwargs["actual_seq_kvlen"]) == 3


def test_the_pass_and_the_backend_import_neither_torchair_nor_torch_npu(tmp_path):
    """A fresh interpreter where both are importable (stand-ins): importing attn_ops, the npu
    backend and this pass loads neither."""
    assert loaded_in_a_fresh_interpreter(
        ["attn_ops", "attn_ops.backends.npu", "attn_ops.backends.npu.torchair_decompose"],
        ("torchair", "torch_npu"), tmp_path) == []
