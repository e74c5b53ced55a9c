"""The ops under torch.compile(fullgraph=True, dynamic=True): one graph, no recompiles."""

import pytest
import torch

import attn_ops
from tests.support.helpers import assert_close

H, HKV, D, BS = 4, 2, 32, 4


def step(q, k, v, k_cache, v_cache, slot_mapping, cu_q, cu_k, block_table, max_q, max_k,
         q_dec, seqlens_k):
    """store the new tokens, prefill over the paged prefix, decode one token per sequence."""
    torch.ops.attn.store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    out = torch.ops.attn.prefill(q * 1.0, k_cache, v_cache, cu_q, cu_k, max_q, max_k, D ** -0.5,
                                 True, block_table)
    dec = torch.ops.attn.decode(q_dec, k_cache, v_cache, seqlens_k, block_table, D ** -0.5)
    return out.sum(-1), dec


def _inputs(lens):
    cache = attn_ops.PagedKVCache(64, BS, HKV, D, max_seq_len=64, dtype=torch.float32)
    batch = cache.prepare_prefill({i: n for i, n in enumerate(lens)})
    t = sum(lens)
    return (torch.randn(t, H, D), torch.randn(t, HKV, D), torch.randn(t, HKV, D),
            cache.k_cache(), cache.v_cache(), batch.slot_mapping, batch.cu_seqlens_q,
            batch.cu_seqlens_k, batch.block_table, batch.max_seqlen_q, batch.max_seqlen_k,
            torch.randn(len(lens), H, D),
            batch.cu_seqlens_k[1:] - batch.cu_seqlens_k[:-1])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_no_recompile_across_token_counts(backend):
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lens in ([3, 5], [7, 1], [2, 9], [13, 4], [6, 6]):
            args = _inputs(lens)
            eager_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            got = compiled(*args)
            want = step(*eager_args)
            for g, w in zip(got, want):
                assert_close(g, w, 1e-5, 1e-5)
            assert torch.equal(args[3], eager_args[3])  # the cache write happened in the graph


def test_ops_appear_in_the_graph_once_each():
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(step, backend=capture, fullgraph=True, dynamic=True)(*_inputs([3, 5]))
    (gm,) = graphs
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    for op in (torch.ops.attn.store_kvcache.default, torch.ops.attn.prefill.default,
               torch.ops.attn.decode.default):
        assert sum(t in (op, op.overloadpacket) for t in targets) == 1
