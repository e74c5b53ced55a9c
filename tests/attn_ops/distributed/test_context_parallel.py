"""Context-parallel prefill: examples/context_parallel.py on CPU ranks, and its plumbing."""

import pytest
import torch

from attn_ops.distributed.context_parallel import (_allgather_plan, context_parallel_prefill,
                                                   load_balanced_chunks, shard_sequence,
                                                   unshard_sequence)
from tests.support.helpers import assert_close


def test_example_on_two_ranks(torchrun):
    """124 tokens (4 chunks of 31), GQA 4/2, both methods, against attn.prefill over the whole
    sequence on one device."""
    results = torchrun("context_parallel.py", 2, "--seq-len", "124")
    assert [r["method"] for r in results] == ["allgather", "ring"]
    for r in results:
        assert r["ok"] and r["world"] == 2 and r["max_rel_err"] <= r["tol"] == 1e-4


def test_ring_on_three_ranks(torchrun):
    """Three ranks: the ring forwards what it received (two hops), 6 chunks of 21."""
    [r] = torchrun("context_parallel.py", 3, "--seq-len", "126", "--method", "ring")
    assert r["ok"] and r["world"] == 3 and r["max_rel_err"] <= r["tol"] == 1e-4


def test_chunks_balance_the_causal_work():
    world = 4
    pairs = []  # (query, key) pairs each rank computes, counted in chunk units
    for rank in range(world):
        a, b = load_balanced_chunks(world, rank)
        pairs.append(a + b + 1)  # chunk g sees g full chunks and half of its own: g + 1/2 each
    assert pairs == [2 * world] * world


def test_shard_then_unshard_is_the_identity(single_rank_group):
    x = torch.randn(14, 3)
    assert torch.equal(shard_sequence(x, 1, 0), x)
    assert torch.equal(unshard_sequence(shard_sequence(x, 1, 0)), x)
    assert torch.equal(shard_sequence(torch.arange(8), 2, 1), torch.tensor([2, 3, 4, 5]))
    with pytest.raises(ValueError, match="multiple of 2 \\* world"):
        shard_sequence(torch.randn(10, 3), 3, 0)


def test_allgather_key_order():
    """World 2: the gathered chunks are [rank0: 0, 3 | rank1: 1, 2]; rank 0's query chunks 0 and
    3 get keys (chunk 0) and (chunks 0, 1, 2, 3), rank 1's chunks 1 and 2 get (0, 1), (0, 1, 2)."""
    cu_q, cu_k, order = _allgather_plan(2, 0, 5, torch.device("cpu"))
    assert cu_q.tolist() == [0, 5, 10] and cu_k.tolist() == [0, 5, 25]
    assert order.tolist() == [0, 0, 2, 3, 1]
    cu_q, cu_k, order = _allgather_plan(2, 1, 5, torch.device("cpu"))
    assert cu_k.tolist() == [0, 10, 25] and order.tolist() == [0, 2, 0, 2, 3]


@pytest.mark.parametrize("method", ["allgather", "ring"])
def test_one_rank_is_plain_causal_prefill(single_rank_group, method):
    q, k, v = torch.randn(26, 4, 16), torch.randn(26, 1, 16), torch.randn(26, 1, 16)
    cu = torch.tensor([0, 26], dtype=torch.int32)
    with torch.inference_mode():
        out = context_parallel_prefill(q, k, v, 0.25, method=method)
        expected = torch.ops.attn.prefill(q, k, v, cu, cu, 26, 26, 0.25, True)
    assert_close(out, expected, 2e-6, 2e-6)


def test_bad_calls(single_rank_group):
    q, k = torch.randn(6, 4, 16), torch.randn(6, 2, 16)
    with pytest.raises(ValueError, match="method"):
        context_parallel_prefill(q, k, k, 0.25, method="p2p")
    with pytest.raises(ValueError, match="even"):
        context_parallel_prefill(q[:5], k[:5], k[:5], 0.25)
    with pytest.raises(ValueError, match=r"\[2C, H, D\]"):
        context_parallel_prefill(q, k, k[:, :1], 0.25)
