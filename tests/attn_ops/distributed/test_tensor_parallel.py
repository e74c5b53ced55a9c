"""Tensor parallelism over heads: examples/tensor_parallel.py on two CPU ranks, and the cache."""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard

from attn_ops.distributed.tensor_parallel import HeadShardedKVCache, llama_tp_plan


def test_example_on_two_ranks(torchrun):
    """DemoLlama split over heads: prefill + 2 padded decode steps match one device, and prefill
    and decode issue only the projections' collectives (the attn ops none)."""
    r = torchrun("tensor_parallel.py", 2, "--prompts", "13", "29", "6", "--steps", "2")
    assert r["ok"] and r["world"] == 2 and r["steps"] == 3
    assert r["max_rel_err"] <= r["tol"] == 1e-4
    expected = {"all_reduce": 4, "all_gather_into_tensor": 1}  # o_proj, down_proj x 2; lm_head
    assert r["prefill_collectives"] == r["decode_collectives"] == expected


def test_head_sharded_cache(single_rank_group):
    mesh = init_device_mesh("cpu", (1,))
    cache = HeadShardedKVCache(mesh, 8, 4, 2, 16, max_seq_len=20, num_layers=2,
                               dtype=torch.float32)
    k = cache.k_cache(1)
    assert k.placements == (Shard(2),) and k.shape == (8, 4, 2, 16)
    assert k.to_local().data_ptr() == cache.local.k_cache(1).data_ptr()  # no copy
    batch = cache.prepare_prefill({"a": 5})  # planning is the local planner's
    assert batch.slot_mapping.tolist() == [0, 1, 2, 3, 4] and "a" in cache
    with pytest.raises(ValueError, match="num_kv_heads"):
        HeadShardedKVCache(init_device_mesh("cpu", (1,)), 8, 4, 0, 16, max_seq_len=20)


def test_plan_names_every_projection():
    plan = llama_tp_plan(2)
    assert len(plan) == 2 * 7 + 1 and "layers.1.attn.o_proj" in plan and "lm_head" in plan
