"""PagedKVCache: the metadata it plans drives the ops to the same result as dense attention."""

import pytest
import torch

import attn_ops
from attn_ops.paged_cache import CacheFull, PagedKVCache
from tests.support.helpers import assert_close, prefill_f64

H, HKV, D = 4, 2, 32


def _cache(**kw):
    args = dict(num_blocks=32, block_size=4, num_kv_heads=HKV, head_dim=D, max_seq_len=40,
                dtype=torch.float32)
    args.update(kw)
    return PagedKVCache(**args)


def test_prefill_plan_shapes_and_values():
    cache = _cache()
    batch = cache.prepare_prefill({"a": 5, "b": 3})
    assert batch.cu_seqlens_q.tolist() == [0, 5, 8]
    assert batch.cu_seqlens_k.tolist() == [0, 5, 8]
    assert (batch.max_seqlen_q, batch.max_seqlen_k) == (5, 5)
    assert batch.block_table.shape == (2, 10) and batch.block_table.dtype == torch.int32
    assert batch.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    a_blocks = cache.blocks("a")
    assert batch.slot_mapping[:5].tolist() == [a_blocks[p // 4] * 4 + p % 4 for p in range(5)]
    assert len(set(batch.slot_mapping.tolist())) == 8
    assert batch.is_prefix_free


def test_chunked_prefill_then_decode_matches_dense_attention():
    """Prefill a prompt in two chunks (prefix reuse), then decode: equal to one dense pass."""
    cache = _cache()
    total = 11
    q_all, k_all, v_all = torch.randn(total, H, D), torch.randn(total, HKV, D), torch.randn(total, HKV, D)
    outs = []
    for lo, hi in ((0, 6), (6, 10)):
        batch = cache.prepare_prefill({"s": hi - lo})
        attn_ops.store_kvcache(k_all[lo:hi], v_all[lo:hi], cache.k_cache(), cache.v_cache(),
                               batch.slot_mapping)
        outs.append(attn_ops.prefill(q_all[lo:hi], cache.k_cache(), cache.v_cache(),
                                     batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q,
                                     batch.max_seqlen_k, 0.2, True, batch.block_table))
    step = cache.prepare_decode(["s"], pad_to=3)
    assert step.seqlens_k.tolist() == [11, 0, 0] and step.slot_mapping[1:].tolist() == [-1, -1]
    assert step.positions.tolist() == [10, 0, 0]
    key = torch.cat([k_all[10:], torch.randn(2, HKV, D)])
    val = torch.cat([v_all[10:], torch.randn(2, HKV, D)])
    attn_ops.store_kvcache(key, val, cache.k_cache(), cache.v_cache(), step.slot_mapping)
    q_dec = torch.cat([q_all[10:], torch.randn(2, H, D)])
    dec = attn_ops.decode(q_dec, cache.k_cache(), cache.v_cache(), step.seqlens_k,
                          step.block_table, 0.2)
    got = torch.cat(outs + [dec[:1]])
    assert_close(got, prefill_f64(q_all, k_all, v_all, [total], [total], 0.2, True), 1e-5, 1e-5)
    assert torch.equal(dec[1:], torch.zeros(2, H, D))


def test_fork_shares_full_blocks_and_copies_the_tail():
    cache = _cache()
    batch = cache.prepare_prefill({"p": 6})
    k, v = torch.randn(6, HKV, D), torch.randn(6, HKV, D)
    attn_ops.store_kvcache(k, v, cache.k_cache(), cache.v_cache(), batch.slot_mapping)
    free_before = cache.num_free_blocks
    cache.fork("p", "c")
    pb, cb = cache.blocks("p"), cache.blocks("c")
    assert cb[0] == pb[0] and cb[1] != pb[1]  # block 0 full (shared), block 1 partial (copied)
    assert cache.num_free_blocks == free_before - 1
    assert torch.equal(cache.k_cache()[cb[1], :2], cache.k_cache()[pb[1], :2])
    assert cache.num_cached("c") == 6
    cache.free("p")
    assert cache.num_free_blocks == free_before - 1 + 1  # shared block 0 still held by "c"
    cache.free("c")
    assert cache.num_free_blocks == 32


def test_errors():
    cache = _cache(num_blocks=2, max_seq_len=40)
    with pytest.raises(CacheFull, match="no free block"):
        cache.prepare_prefill({"a": 9})
    cache = _cache()
    with pytest.raises(ValueError, match="more than max_seq_len=40"):
        cache.prepare_prefill({"a": 41})
    cache.prepare_prefill({"a": 2, "b": 2})
    with pytest.raises(ValueError, match="pad_to=1 is smaller"):
        cache.prepare_decode(["a", "b"], pad_to=1)
