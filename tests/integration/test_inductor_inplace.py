"""In-place cache writes under Inductor (CPU): reinplaced, ordered, and landing in the caller's
tensors.

Dynamo/AOTAutograd functionalize ``attn.store_kvcache`` (it declares ``Tensor(a!) k_cache``),
so the graph Inductor sees returns new caches; Inductor's reinplace pass must turn that back
into an in-place call on the real cache, or it would clone the whole cache every step. Each test
inspects the generated code (``run_and_get_code``) with ``cache_copies`` and checks values
against eager mode on the reference backend.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from tests.support.capture import (CFG, cache_copies, eager_reference, make_layer, run_schedule,
                             schedule, steps_of)
from tests.support.helpers import TOLERANCES, assert_close

TOL = TOLERANCES[torch.float32]
SCALE = CFG.head_dim ** -0.5


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Fresh Dynamo state and counters, and no compile caches: torch 2.13's FX graph cache was
    seen to hand the code compiled for caches that share one allocation to a model whose
    caches are separate tensors (same graph, different aliasing), which would make the
    generated-code checks depend on test order."""
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()


__all__ = ["schedule"]  # the module-scoped fixture shared with the other test files


def assert_no_cache_copies(codes: list[str], numel: int) -> None:
    assert codes, "nothing was compiled"
    for code in codes:
        found = cache_copies(code, numel)
        assert not found, "generated code copies a cache:\n" + "\n".join(found)


# ---------------------------------------------------------------------------------------------
# Caches as module buffers: the whole serving schedule
# ---------------------------------------------------------------------------------------------

def test_compiled_steps_write_buffers_in_place(schedule):
    """Prefill (with a cached prefix), decode with padding, a wider table, batch 1: every step
    matches eager, the buffers end in the eager state, and no graph copies a cache."""
    steps, k0, v0 = schedule
    ref_outs, ref_k, ref_v = eager_reference(steps, k0, v0)
    layer = make_layer(k0.clone(), v0.clone())
    k_cache = layer.k_cache
    compiled = {kind: torch.compile(m, fullgraph=True, dynamic=True)
                for kind, m in steps_of(layer).items()}
    outs, codes = run_and_get_code(run_schedule, compiled, steps)
    for i, (out, ref) in enumerate(zip(outs, ref_outs)):
        assert_close(out, ref, *TOL, what=f"step {i} ({steps[i].kind})")
    assert layer.k_cache is k_cache
    assert_close(layer.k_cache, ref_k, *TOL, what="k_cache")
    assert_close(layer.v_cache, ref_v, *TOL, what="v_cache")
    assert_no_cache_copies(codes, k0.numel())
    # Lengths are data and sizes are symbolic: one graph per step kind, plus one for the
    # batch-1 decode (Dynamo specialises size-1 dims even under dynamic=True).
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])


# ---------------------------------------------------------------------------------------------
# Caches as graph inputs
# ---------------------------------------------------------------------------------------------

def store_then_decode(q, k, v, k_cache, v_cache, slot_mapping, seqlens_k, block_table):
    torch.ops.attn.store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    return torch.ops.attn.decode(q, k_cache, v_cache, seqlens_k, block_table, SCALE)


def decode_store_decode(q, k, v, k_cache, v_cache, slot_mapping, seqlens_k, block_table):
    """Attend before the new token is stored, store it, attend again: both orders matter."""
    before = torch.ops.attn.decode(q, k_cache, v_cache, seqlens_k - 1, block_table, SCALE)
    torch.ops.attn.store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    after = torch.ops.attn.decode(q, k_cache, v_cache, seqlens_k, block_table, SCALE)
    return before, after


def _decode_operands(schedule, seed=5):
    """q, k, v for the schedule's first decode step (B=2), its metadata, fresh caches."""
    steps, k0, v0 = schedule
    _, slots, seqlens, table = next(s.args for s in steps if s.kind == "decode")
    gen = torch.Generator().manual_seed(seed)
    b, h, hkv, d = slots.shape[0], CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
    q = torch.randn(b, h, d, generator=gen)
    k = torch.randn(b, hkv, d, generator=gen)
    v = torch.randn(b, hkv, d, generator=gen)
    return (q, k, v), (slots, seqlens, table), (k0, v0)


def test_cache_graph_inputs_are_written_in_place(schedule):
    (q, k, v), meta, (k0, v0) = _decode_operands(schedule)
    eager_k, eager_v = k0.clone(), v0.clone()
    expected = store_then_decode(q, k, v, eager_k, eager_v, *meta)
    mine_k, mine_v = k0.clone(), v0.clone()
    ptr = mine_k.data_ptr()
    out, codes = run_and_get_code(torch.compile(store_then_decode, fullgraph=True),
                                  q, k, v, mine_k, mine_v, *meta)
    # The decode sees the token stored just before it: a reordered graph reads the random
    # contents the slot held and differs.
    assert_close(out, expected, *TOL)
    assert_close(mine_k, eager_k, *TOL, what="caller's k_cache")
    assert_close(mine_v, eager_v, *TOL, what="caller's v_cache")
    assert not torch.equal(mine_k, k0) and mine_k.data_ptr() == ptr
    assert_no_cache_copies(codes, k0.numel())


def test_reads_before_and_after_the_store_keep_their_order(schedule):
    """Correct either side of the store. (Inductor hoists the functional store above the first
    read and then must copy the cache to keep that read's old view: docs/export.md says to
    attend only after storing in one compiled step, as every layer does.)"""
    (q, k, v), meta, (k0, v0) = _decode_operands(schedule)
    eager_k, eager_v = k0.clone(), v0.clone()
    before, after = decode_store_decode(q, k, v, eager_k, eager_v, *meta)
    mine_k, mine_v = k0.clone(), v0.clone()
    c_before, c_after = torch.compile(decode_store_decode, fullgraph=True)(
        q, k, v, mine_k, mine_v, *meta)
    assert_close(c_before, before, *TOL, what="decode before the store")
    assert_close(c_after, after, *TOL, what="decode after the store")
    assert not torch.allclose(before, after), "the new token changed nothing: test too weak"
    assert_close(mine_k, eager_k, *TOL, what="caller's k_cache")


# ---------------------------------------------------------------------------------------------
# Several layers sharing allocations
# ---------------------------------------------------------------------------------------------

class TwoLayerDecode(torch.nn.Module):
    """Two example layers; layer i's cache buffers are ``k_caches[i]`` and ``v_caches[i]``."""

    def __init__(self, k_caches, v_caches):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            make_layer(k, v, seed=10 + i) for i, (k, v) in enumerate(zip(k_caches, v_caches)))

    def forward(self, x, slot_mapping, seqlens_k, block_table):
        for layer in self.layers:
            x = x + layer.decode(x, slot_mapping, seqlens_k, block_table)
        return x


def _two_layer_run(schedule, split):
    """Eager and compiled runs of TwoLayerDecode over caches laid out by ``split(stack)``,
    where ``stack`` is a random ``[2, L=2, NB, BS, Hkv, D]`` tensor (K then V)."""
    steps, k0, _ = schedule
    args = next(s.args for s in steps if s.kind == "decode")
    gen = torch.Generator().manual_seed(7)
    stack0 = torch.randn((2, 2) + tuple(k0.shape), generator=gen)
    (eager_k, eager_v), (mine_k, mine_v) = split(stack0.clone()), split(stack0.clone())
    with torch.no_grad():
        expected = TwoLayerDecode(eager_k, eager_v)(*args)
        out, codes = run_and_get_code(torch.compile(TwoLayerDecode(mine_k, mine_v),
                                                    fullgraph=True), *args)
    assert_close(out, expected, *TOL)
    for i in range(2):
        assert_close(mine_k[i], eager_k[i], *TOL, what=f"layer {i} k_cache")
        assert_close(mine_v[i], eager_v[i], *TOL, what=f"layer {i} v_cache")
    assert not torch.equal(mine_v[1], stack0[1, 1]), "layer 1's v cache was not written"
    return codes, k0.numel()


def _k_and_v_stacks(stack):
    """One allocation for all layers' K, another for all layers' V; per-layer views of each."""
    k_all, v_all = stack[0].clone(), stack[1].clone()
    return list(k_all.unbind(0)), list(v_all.unbind(0))


def _one_allocation(stack):
    """K and V of every layer in one tensor (``kv[0, i]``, ``kv[1, i]``)."""
    return [stack[0, i] for i in range(2)], [stack[1, i] for i in range(2)]


def test_layer_views_of_k_and_v_stacks_are_written_in_place(schedule):
    codes, numel = _two_layer_run(schedule, _k_and_v_stacks)
    assert_no_cache_copies(codes, numel)


def test_k_and_v_in_one_allocation_stay_correct(schedule):
    """Values stay right. (Inductor reinplaces only one mutated argument per storage, so here
    it copies the V cache of every store: docs/export.md says to give K and V separate
    allocations, as the test above does.)"""
    _two_layer_run(schedule, _one_allocation)


def test_slicing_a_stacked_cache_inside_the_graph_stays_correct(schedule):
    """Per-layer views taken inside the compiled function: values stay right. (Here Inductor
    copies the whole stack for every layer after the first; docs/export.md: bind the views
    outside, as the test above does.)"""
    (q, k, v), meta, (k0, _) = _decode_operands(schedule)
    gen = torch.Generator().manual_seed(8)
    kv0 = torch.randn((2, 2) + tuple(k0.shape), generator=gen)

    def two_layers(q, k, v, kv, slot_mapping, seqlens_k, block_table):
        out = 0
        for i in range(kv.shape[0]):
            out = out + store_then_decode(q, k, v, kv[i, 0], kv[i, 1], slot_mapping, seqlens_k,
                                          block_table)
        return out

    eager_kv, mine_kv = kv0.clone(), kv0.clone()
    expected = two_layers(q, k, v, eager_kv, *meta)
    out = torch.compile(two_layers, fullgraph=True)(q, k, v, mine_kv, *meta)
    assert_close(out, expected, *TOL)
    assert_close(mine_kv, eager_kv, *TOL, what="stacked caches")


# ---------------------------------------------------------------------------------------------
# The detector itself must be able to fail
# ---------------------------------------------------------------------------------------------

def test_detector_flags_a_real_cache_copy(schedule):
    (q, k, v), meta, (k0, v0) = _decode_operands(schedule)

    def store_and_snapshot(q, k, v, k_cache, v_cache, slot_mapping, seqlens_k, block_table):
        snapshot = k_cache * 1  # a cache-sized buffer, as a clone would allocate
        torch.ops.attn.store_kvcache(k, v, k_cache, v_cache, slot_mapping)
        return snapshot, torch.ops.attn.decode(q, k_cache, v_cache, seqlens_k, block_table,
                                               SCALE)

    _, codes = run_and_get_code(torch.compile(store_and_snapshot, fullgraph=True),
                                q, k, v, k0.clone(), v0.clone(), *meta)
    assert any(cache_copies(code, k0.numel()) for code in codes)


def test_detector_reads_aoti_cpp_allocations_and_copy_kernels():
    numel = 16 * 4 * 2 * 16
    alloc = ("static constexpr int64_t int_array_3[] = {16L, 4L, 2L, 16L};\n"
             "AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(4, int_array_3, "
             "int_array_4, cached_torch_dtype_float32, cached_torch_device_type_cpu, "
             "this->device_idx_, &buf3_handle));")
    small = alloc.replace("{16L, 4L, 2L, 16L}", "{s37, 32L}")
    assert cache_copies(alloc, numel) and not cache_copies(small, numel)
    assert cache_copies("    cpp_fused_as_strided_clone_0(arg0_1, buf3)", numel)
    assert cache_copies("aoti_torch_copy_(layer_k_cache, buf4, 0)", numel)
    assert not cache_copies("    /*allow_h2d_copy=*/true);", numel)
