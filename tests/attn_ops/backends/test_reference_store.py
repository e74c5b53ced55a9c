"""The reference store's CPU path (two index_copy_ calls, padding rows dropped on the host) writes
exactly what its sync-free path (the one every other device takes) writes."""

import pytest
import torch

from attn_ops.backends import reference


@pytest.mark.parametrize("slots", [
    [5, 0, 13, 2],            # no padding
    [5, -1, 13, -1],          # some padding
    [-1, -1, -1, -1],         # only padding: nothing written
    [-1, 7, -1, 3],           # padding first
])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_cpu_store_matches_the_sync_free_store(slots, index_dtype, monkeypatch):
    key, value = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    slot_mapping = torch.tensor(slots, dtype=index_dtype)
    caches = [torch.randn(4, 4, 3, 8) for _ in range(2)]
    host = [c.clone() for c in caches]
    reference.store_kvcache(key, value, *host, slot_mapping)
    monkeypatch.setattr(reference, "_on_host", lambda t: False)
    general = [c.clone() for c in caches]
    reference.store_kvcache(key, value, *general, slot_mapping)
    for a, b, original, src in zip(host, general, caches, (key, value)):
        assert torch.equal(a, b)
        flat, before = a.view(-1, 3, 8), original.view(-1, 3, 8)
        written = [s for s in slots if s >= 0]
        for t, s in enumerate(slots):
            if s >= 0:
                assert torch.equal(flat[s], src[t])
        untouched = [i for i in range(16) if i not in written]
        assert torch.equal(flat[untouched], before[untouched])


def test_long_slot_lists_take_the_reduction():
    # Past 64 slots the host path drops the padding rows with a reduction: every slot of both
    # (random) caches checked, the written ones against their rows, the others unchanged
    key, value = torch.randn(100, 2, 8), torch.randn(100, 2, 8)
    slot_mapping = torch.randperm(104)[:100]
    slot_mapping[::7] = -1
    caches = [torch.randn(13, 8, 2, 8) for _ in range(2)]
    k_cache, v_cache = (c.clone() for c in caches)
    reference.store_kvcache(key, value, k_cache, v_cache, slot_mapping)
    for cache, original, src in zip((k_cache, v_cache), caches, (key, value)):
        want = original.view(-1, 2, 8).clone()
        for t, s in enumerate(slot_mapping.tolist()):
            if s >= 0:
                want[s] = src[t]
        assert torch.equal(cache.view(-1, 2, 8), want)
