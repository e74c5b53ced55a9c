"""DTensor rules of the attn ops, in one process (a one-rank gloo group).

Head sharding itself (two ranks, each with half the heads) runs in test_tensor_parallel.py; here:
the head-sharded rule is chosen (outputs Shard(1), no collective, the plain op's values), the
store's write reaches the caches, and placements the store cannot serve raise.
"""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.experimental import implicit_replication

import attn_ops.distributed  # noqa: F401  (registers the rules)
from attn_ops.distributed.sharding import register_sharding_rules
from tests.support.helpers import assert_close, cu_seqlens

H, HKV, D = 6, 3, 16


@pytest.fixture(scope="module")
def mesh(single_rank_group):
    return init_device_mesh("cpu", (1,))


def _shard(t, mesh, dim):
    return DTensor.from_local(t, mesh, [Shard(dim)], run_check=False)


def test_rules_register_once():
    assert register_sharding_rules() == []  # the import registered every op that exists


def test_head_sharded_prefill_decode_store(mesh):
    lens = [13, 6]
    cu = cu_seqlens(lens)
    q, k, v = torch.randn(19, H, D), torch.randn(19, HKV, D), torch.randn(19, HKV, D)
    out = torch.ops.attn.prefill(_shard(q, mesh, 1), _shard(k, mesh, 1), _shard(v, mesh, 1),
                                 DTensor.from_local(cu, mesh, [Replicate()]),
                                 DTensor.from_local(cu, mesh, [Replicate()]), 13, 13, D ** -0.5)
    assert out.placements == (Shard(1),)
    assert_close(out.to_local(), torch.ops.attn.prefill(q, k, v, cu, cu, 13, 13, D ** -0.5),
                 1e-6, 1e-6)

    k_cache, v_cache = torch.randn(5, 4, HKV, D), torch.randn(5, 4, HKV, D)
    dk, dv = _shard(k_cache.clone(), mesh, 2), _shard(v_cache.clone(), mesh, 2)
    slots = torch.tensor([3, -1, 17, 9, 0])
    key, value = torch.randn(5, HKV, D), torch.randn(5, HKV, D)
    with implicit_replication():
        torch.ops.attn.store_kvcache(_shard(key, mesh, 1), _shard(value, mesh, 1), dk, dv, slots)
    torch.ops.attn.store_kvcache(key, value, k_cache, v_cache, slots)
    assert torch.equal(dk.to_local(), k_cache) and torch.equal(dv.to_local(), v_cache)

    qd, seqlens = torch.randn(3, H, D), torch.tensor([7, 0, 20], dtype=torch.int32)
    table = torch.tensor([[2, 0, 1, 3, 4]] * 3, dtype=torch.int32)
    with implicit_replication():
        od = torch.ops.attn.decode(_shard(qd, mesh, 1), dk, dv, seqlens, table, 0.3)
    assert od.placements == (Shard(1),)
    assert_close(od.to_local(), torch.ops.attn.decode(qd, k_cache, v_cache, seqlens, table, 0.3),
                 1e-6, 1e-6)


def test_store_refuses_caches_it_would_have_to_redistribute(mesh):
    key = _shard(torch.randn(2, HKV, D), mesh, 1)
    sharded = _shard(torch.randn(4, 4, HKV, D), mesh, 2)
    replicated = DTensor.from_local(torch.randn(4, 4, HKV, D), mesh, [Replicate()])
    with implicit_replication(), pytest.raises(Exception, match="both be sharded on their head"):
        torch.ops.attn.store_kvcache(key, key, replicated, sharded, torch.tensor([0, 1]))
    on_tokens = _shard(torch.randn(4, 4, HKV, D), mesh, 0)
    with implicit_replication(), pytest.raises(Exception, match="cannot be redistributed"):
        torch.ops.attn.store_kvcache(key, key, on_tokens, on_tokens, torch.tensor([0, 1]))


def test_store_refuses_a_multi_dim_mesh(single_rank_group):
    mesh2 = init_device_mesh("cpu", (1, 1))
    cache = DTensor.from_local(torch.randn(4, 4, HKV, D), mesh2, [Replicate(), Shard(2)])
    key = DTensor.from_local(torch.randn(2, HKV, D), mesh2, [Replicate(), Shard(1)])
    with implicit_replication(), pytest.raises(Exception, match="1-D tensor-parallel sub-mesh"):
        torch.ops.attn.store_kvcache(key, key, cache, cache, torch.tensor([0, 1]))


def test_import_attn_ops_stays_lean():
    import subprocess
    import sys
    code = ("import sys, attn_ops; bad = [m for m in ('attn_ops.distributed', "
            "'torch.distributed.tensor') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_with_lse_and_merge_states_keep_their_sharding(mesh):
    cu = cu_seqlens([9, 4])
    q, k, v = torch.randn(13, H, D), torch.randn(13, HKV, D), torch.randn(13, HKV, D)
    with implicit_replication():
        out, lse = torch.ops.attn.prefill_with_lse(_shard(q, mesh, 1), _shard(k, mesh, 1),
                                                   _shard(v, mesh, 1), cu, cu, 9, 9, 0.25)
    assert out.placements == lse.placements == (Shard(1),)
    ref_out, ref_lse = torch.ops.attn.prefill_with_lse(q, k, v, cu, cu, 9, 9, 0.25)
    assert_close(out.to_local(), ref_out, 1e-6, 1e-6)
    assert_close(lse.to_local(), ref_lse, 1e-6, 1e-6)
    other_out, other_lse = torch.randn(13, H, D), torch.randn(13, H)
    expected = torch.ops.attn.merge_states(ref_out, ref_lse, other_out, other_lse)
    for dim_out, dim_lse in ((1, 1), (0, 0)):  # heads, then tokens
        merged = torch.ops.attn.merge_states(
            _shard(ref_out, mesh, dim_out), _shard(ref_lse, mesh, dim_lse),
            _shard(other_out, mesh, dim_out), _shard(other_lse, mesh, dim_lse))
        assert [m.placements for m in merged] == [(Shard(dim_out),), (Shard(dim_lse),)]
        for got, want in zip(merged, expected):
            assert_close(got.to_local(), want, 1e-6, 1e-6)
