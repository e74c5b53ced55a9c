"""PagedKVCache: the metadata it plans drives the ops to the same result as dense attention."""

import copy

import pytest
import torch

import attn_ops
from attn_ops.demo.model import DemoConfig, DemoLlama
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
    with pytest.raises(CacheFull, match="prepare_prefill needs 3 free blocks, the paged cache "
                                        "has 2") as info:
        cache.prepare_prefill({"a": 9})
    assert (info.value.needed, info.value.free) == (3, 2)
    cache = _cache()
    with pytest.raises(ValueError, match="more than max_seq_len=40"):
        cache.prepare_prefill({"a": 41})
    cache.prepare_prefill({"a": 2, "b": 2})
    with pytest.raises(ValueError, match="pad_to=1 is smaller"):
        cache.prepare_decode(["a", "b"], pad_to=1)


# -- every failed planning call leaves the state exactly as it was (issue 12, item 4) -----------

def _state(cache):
    """Everything a planning call may change: bookkeeping (free-list order too) and cache data."""
    return (copy.deepcopy(cache._blocks), dict(cache._lens), list(cache._refs), list(cache._free),
            [t.clone() for t in cache._k + cache._v])


def _assert_state(cache, expected):
    blocks, lens, refs, free, data = _state(cache)
    assert (blocks, lens, refs, free) == expected[:4]
    assert all(torch.equal(a, b) for a, b in zip(data, expected[4]))


def test_cache_full_inside_prefill_reserves_nothing():
    cache = _cache(num_blocks=4)                     # 16 slots; a: 8 fits, then b: 12 does not
    before = _state(cache)
    with pytest.raises(CacheFull):
        cache.prepare_prefill({"a": 8, "b": 12})
    _assert_state(cache, before)
    assert "a" not in cache
    batch = cache.prepare_prefill({"a": 8, "b": 4})  # the retry reserves "a" once
    assert cache.num_cached("a") == 8 and batch.cu_seqlens_k.tolist() == [0, 8, 12]
    assert cache.num_free_blocks == 1


def test_failed_fork_leaks_no_refcount():
    cache = _cache(num_blocks=4)
    cache.prepare_prefill({"p": 6, "x": 8})          # p: one full block + a partial one; x: 2
    before = _state(cache)
    with pytest.raises(CacheFull):
        cache.fork("p", "c")                         # the partial tail needs a 5th block
    _assert_state(cache, before)
    cache.free("p")
    cache.free("x")
    assert cache.num_free_blocks == 4


def test_decode_with_an_unknown_id_advances_nothing():
    cache = _cache()
    cache.prepare_prefill({"a": 3})
    before = _state(cache)
    with pytest.raises(KeyError, match="unknown sequence 'zz'"):
        cache.prepare_decode(["a", "zz"])
    _assert_state(cache, before)
    assert cache.prepare_decode(["a"]).positions.tolist() == [3]


def test_decode_cache_full_mid_batch_advances_nothing():
    cache = _cache(num_blocks=2)
    cache.prepare_prefill({"a": 3, "b": 4})          # a has a free slot, b needs a new block
    before = _state(cache)
    with pytest.raises(CacheFull):
        cache.prepare_decode(["a", "b"])
    _assert_state(cache, before)


def test_decode_past_max_seq_len_mid_batch_advances_nothing():
    cache = _cache(max_seq_len=8)
    cache.prepare_prefill({"a": 3, "b": 8})
    before = _state(cache)
    with pytest.raises(ValueError, match="'b' would hold 9 tokens.*max_seq_len=8"):
        cache.prepare_decode(["a", "b"])
    _assert_state(cache, before)


@pytest.mark.parametrize("count, error, message", [
    (-3, ValueError, r"new_tokens\['a'\] must be >= 0, got -3"),
    (2.7, TypeError, r"new_tokens\['a'\] must be an integer, got 2.7"),
    (True, TypeError, r"new_tokens\['a'\] must be an integer, got True"),
    ("4", TypeError, r"new_tokens\['a'\] must be an integer, got '4'"),
])
def test_bad_token_counts_are_rejected(count, error, message):
    cache = _cache()
    cache.prepare_prefill({"b": 2})
    before = _state(cache)
    with pytest.raises(error, match=message):
        cache.prepare_prefill({"b": 1, "a": count})
    _assert_state(cache, before)


def test_prefill_over_max_seq_len_leaves_no_ghost_sequence():
    cache = _cache()
    before = _state(cache)
    with pytest.raises(ValueError, match="more than max_seq_len=40"):
        cache.prepare_prefill({"a": 41})
    _assert_state(cache, before)
    assert "a" not in cache


TINY = DemoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=48)


@torch.no_grad()
def test_a_failed_decode_after_preemption_leaves_the_survivor_right():
    """Preempt "b", then a stale running list asks to decode it: "a" must decode as if not."""
    model = DemoLlama(TINY, seed=1).eval()
    prompt = torch.randint(0, TINY.vocab_size, (12,))

    def next_logits(failed_call: bool) -> torch.Tensor:
        cache = model.new_cache(num_blocks=16, block_size=4, max_seq_len=32)
        pre = cache.prepare_prefill({"a": 5, "b": 7})
        first = model.prefill(prompt, cache, pre).argmax(-1)
        cache.free("b")                                 # preempted: re-prefilled later
        if failed_call:
            with pytest.raises(KeyError, match="'b'"):
                cache.prepare_decode(["a", "b"], pad_to=2)
        step = cache.prepare_decode(["a"], pad_to=2)
        return model.decode(torch.stack([first[0], first[0]]), cache, step)[0]

    assert_close(next_logits(True), next_logits(False), 0, 0, "logits of 'a'")
