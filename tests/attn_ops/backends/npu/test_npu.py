"""The npu backend's lowering, checked call by call and by value against a CPU emulator.

No NPU exists here: tests/support/npu_emulator.py registers CPU kernels for the torch_npu ops (only
when torch_npu is absent). The backend's op functions are called directly on CPU tensors (its
documented test hook); the registry itself never picks "npu" for CPU tensors (tested below).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

import attn_ops
from tests.support import npu_emulator as emu
from tests.support.helpers import loaded_in_a_fresh_interpreter
from attn_ops import registry
from attn_ops.contract import OpConfig
from attn_ops.backends import npu, reference
from attn_ops.backends.npu import lowering
from tests.support.helpers import TOLERANCES, assert_close, cu_seqlens, prefill_f64, random_paged

EMULATED = emu.install()
pytestmark = pytest.mark.skipif(not EMULATED, reason="a real torch_npu is loaded; these tests "
                                                     "drive the CPU emulator of its ops")
BF16 = torch.bfloat16
D = 128  # FIA v2 TND is documented for bf16 with head dim 128 / 192


def _fia_calls(calls):
    return [c for c in calls if c["op"] == lowering.FIA_V2]


def _prefill_inputs(lens_q, lens_k, h, hkv, paged_block=None, tail=0, dtype=BF16):
    q = torch.randn(sum(lens_q) + tail, h, D, dtype=dtype)
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    if paged_block is None:
        k = torch.randn(sum(lens_k) + tail, hkv, D, dtype=dtype)
        return q, k, torch.randn_like(k), cq, ck, None
    pb = random_paged(lens_k, hkv, D, paged_block, dtype)
    return q, pb.k_cache, pb.v_cache, cq, ck, pb.block_table


def _both(fn_args, **kw):
    with emu.recording() as calls:
        out = npu.prefill(*fn_args, **kw)
    ref = reference.prefill(*fn_args, **kw)
    return out, ref, list(calls)


# ---------------------------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lens_q, lens_k, paged", [
    ([13, 1, 7], [13, 1, 7], False),           # no cache
    ([5, 0, 9], [5, 0, 9], False),             # an empty sequence in the middle
    ([4, 7, 100], [130, 7, 300], True),        # prefix caching through the block table
    ([1, 123], [129, 123], True),
])
@pytest.mark.parametrize("h, hkv", [(8, 2), (4, 4), (6, 1)])
def test_prefill_matches_reference(lens_q, lens_k, paged, h, hkv):
    args = _prefill_inputs(lens_q, lens_k, h, hkv, 128 if paged else None, tail=3)
    q, k, v, cq, ck, table = args
    out, ref, calls = _both((q, k, v, cq, ck, max(lens_q), max(lens_k), D ** -0.5, True, table))
    assert_close(out, ref, *TOLERANCES[BF16])
    assert torch.equal(out[sum(lens_q):], torch.zeros_like(out[sum(lens_q):]))  # padded tail
    (call,) = _fia_calls(calls)
    kw = call["kwargs"]
    assert kw["input_layout"] == "TND" and kw["sparse_mode"] == 3
    assert kw["actual_seq_qlen"] == cq[1:].tolist()  # cumulative
    if paged:
        assert kw["actual_seq_kvlen"] == lens_k  # per request with a block table
        assert call["key"].shape == (k.shape[0], 128, hkv * D)  # 3-D view of the cache ...
        assert call["key"].data_ptr() == k.data_ptr()  # ... not a copy
        assert kw["block_table"].dtype == torch.int32 and kw["block_size"] == 128
    else:
        assert kw["actual_seq_kvlen"] == ck[1:].tolist()  # cumulative without one
        assert kw.get("block_table") is None and kw.get("block_size", 0) == 0
        assert call["key"].shape[0] == sum(lens_k)  # the padded tail is sliced off
    assert call["query"].shape[0] == sum(lens_q)
    assert kw["num_query_heads"] == h and kw["num_key_value_heads"] == hkv
    assert kw["softmax_scale"] == D ** -0.5
    assert torch.equal(kw["atten_mask"], torch.ones(2048, 2048, dtype=torch.bool).triu(1))


def test_prefill_against_float64_oracle():
    lens = [17, 3, 40]
    q, k, v, cq, ck, _ = _prefill_inputs(lens, lens, 4, 2)
    out = npu.prefill(q, k, v, cq, ck, 40, 40, 0.3)
    assert_close(out, prefill_f64(q, k, v, lens, lens, 0.3, True), *TOLERANCES[BF16])


@pytest.mark.parametrize("causal, window, mode, pre, nxt", [
    (True, 5, 4, 5, 0),
    (False, 6, 4, 6, lowering.INT32_MAX),
    (False, -1, 0, lowering.INT32_MAX, lowering.INT32_MAX),
    (True, 0, 4, 0, 0),
])
@pytest.mark.parametrize("paged", [False, True])
def test_prefill_masking_modes(causal, window, mode, pre, nxt, paged):
    lens_q, lens_k = ([9, 31], [9, 31]) if not paged else ([9, 31], [140, 31])
    q, k, v, cq, ck, table = _prefill_inputs(lens_q, lens_k, 4, 2, 128 if paged else None)
    out, ref, calls = _both((q, k, v, cq, ck, 31, max(lens_k), 0.2, causal, table),
                            window_left=window)
    assert_close(out, ref, *TOLERANCES[BF16])
    kw = _fia_calls(calls)[0]["kwargs"]  # the dispatcher drops arguments left at default
    got = (kw.get("sparse_mode", 0), kw.get("pre_tokens", lowering.INT32_MAX),
           kw.get("next_tokens", lowering.INT32_MAX))
    assert got == (mode, pre, nxt)
    assert (kw.get("atten_mask") is None) == (mode == 0)


def test_prefill_without_queries_returns_zeros_and_calls_nothing():
    q, k, v, cq, ck, _ = _prefill_inputs([0, 0], [0, 0], 4, 2, tail=4)
    with emu.recording() as calls:
        out = npu.prefill(q, k, v, cq, ck, 0, 0, 0.1)
        out2, lse = npu.prefill(q, k, v, cq, ck, 0, 0, 0.1, return_lse=True)
    assert torch.equal(out, torch.zeros_like(q)) and torch.equal(out2, out) and not calls
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32 and torch.isneginf(lse).all()


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, BF16])
@pytest.mark.parametrize("h, hkv, d", [(8, 2, 64), (4, 4, 128), (16, 1, 32)])
@pytest.mark.parametrize("block_size", [16, 128])
def test_decode_matches_reference(dtype, h, hkv, d, block_size):
    lens = [5, 0, 33, 1, 0]  # zeros: padded rows of a captured batch
    pb = random_paged(lens, hkv, d, block_size, dtype, table_width=4)
    q = torch.randn(len(lens), h, d, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    with emu.recording() as calls:
        out = npu.decode(q, pb.k_cache, pb.v_cache, seqlens, pb.block_table.long(), 0.125)
    ref = reference.decode(q, pb.k_cache, pb.v_cache, seqlens, pb.block_table, 0.125)
    assert_close(out, ref, *TOLERANCES[dtype])  # NaN poison on empty rows would fail here
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    (call,) = _fia_calls(calls)
    kw = call["kwargs"]
    assert kw["input_layout"] == "BNSD" and call["query"].shape == (len(lens), h, 1, d)
    assert call["key"].shape == (pb.k_cache.shape[0], block_size, hkv * d)
    assert call["key"].data_ptr() == pb.k_cache.data_ptr()
    assert kw["actual_seq_kvlen"] == lens and kw["block_size"] == block_size
    assert kw["block_table"].dtype == torch.int32  # int64 tables are cast
    assert kw["softmax_scale"] == 0.125 and kw.get("atten_mask") is None
    assert (kw["num_query_heads"], kw["num_key_value_heads"]) == (h, hkv)


def _same_lse(got, want):
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))  # no key / padding: -inf
    finite = torch.isfinite(want)
    assert torch.isfinite(got[finite]).all()
    assert_close(got[finite], want[finite], 1e-4, 1e-4)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("paged", [False, True])
def test_prefill_with_lse_matches_reference(causal, paged):
    # a sequence without keys, one with more queries than keys (causal rows that see nothing),
    # an empty one, and 3 padded tail rows
    lens_q, lens_k = ([4, 3, 0, 9], [0, 2, 0, 9]) if not paged else ([4, 3, 0, 9], [0, 2, 0, 140])
    args = _prefill_inputs(lens_q, lens_k, 4, 2, 128 if paged else None, tail=3)
    q, k, v, cq, ck, table = args
    call = (q, k, v, cq, ck, 9, max(lens_k), D ** -0.5, causal, table)
    with emu.recording() as calls:
        out, lse = npu.prefill(*call, return_lse=True)
    ref_out, ref_lse = reference.prefill(*call, return_lse=True)
    assert_close(out, ref_out, *TOLERANCES[BF16])  # the emulator's NaN rows would fail here
    _same_lse(lse, ref_lse)
    (fia,) = _fia_calls(calls)
    assert fia["kwargs"]["return_softmax_lse"] is True
    with emu.recording() as calls:
        plain = npu.prefill(*call)
    assert torch.equal(plain, out)  # the same output without the lse,
    assert "return_softmax_lse" not in _fia_calls(calls)[0]["kwargs"]  # not asked for


def test_decode_with_lse_matches_reference():
    lens = [5, 0, 33, 1, 0]
    pb = random_paged(lens, 2, 64, 16, BF16, table_width=4)
    q = torch.randn(len(lens), 8, 64, dtype=BF16)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    args = (q, pb.k_cache, pb.v_cache, seqlens, pb.block_table, 0.125)
    with emu.recording() as calls:
        out, lse = npu.decode(*args, return_lse=True)
    ref_out, ref_lse = reference.decode(*args, return_lse=True)
    assert_close(out, ref_out, *TOLERANCES[BF16])
    _same_lse(lse, ref_lse)
    (fia,) = _fia_calls(calls)
    assert fia["kwargs"]["return_softmax_lse"] is True
    with emu.recording() as calls:
        npu.decode(*args)
    assert "return_softmax_lse" not in _fia_calls(calls)[0]["kwargs"]


def test_decode_empty_batch():
    kc = torch.randn(2, 16, 1, 64, dtype=BF16)
    q = torch.randn(0, 2, 64, dtype=BF16)
    args = (q, kc, kc, torch.zeros(0, dtype=torch.int32), torch.zeros(0, 1, dtype=torch.int32),
            0.1)
    with emu.recording() as calls:
        out = npu.decode(*args)
        out2, lse = npu.decode(*args, return_lse=True)
    assert out.shape == out2.shape == q.shape and lse.shape == (0, 2) and not calls


# ---------------------------------------------------------------------------------------------
# store_kvcache
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", [name for _, name in lowering.STORE_IMPLS])
@pytest.mark.parametrize("slots, slot_dtype", [
    ([3, -1, 17, 63, -1, 40], torch.int64),
    ([-1, -1], torch.int32),                  # nothing valid: the caches must not change
    ([0, 13, 27], torch.int32),
])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_store_matches_reference(impl, slots, slot_dtype, dtype):
    k_cache = torch.randn(4, 16, 2, 32, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    key = torch.randn(len(slots), 2, 32, dtype=dtype)
    value = torch.randn_like(key)
    slot_mapping = torch.tensor(slots, dtype=slot_dtype)
    kc, vc = k_cache.clone(), v_cache.clone()
    with emu.recording() as calls:
        npu.store_kvcache_with(impl, key, value, kc, vc, slot_mapping)
    reference.store_kvcache(key, value, k_cache, v_cache, slot_mapping)
    assert torch.equal(kc, k_cache) and torch.equal(vc, v_cache)
    assert [c["op"] for c in calls] == [impl] * (2 if impl == "npu_scatter_nd_update_" else 1)
    call = calls[0]
    if impl == "npu_scatter_pa_kv_cache":
        assert call["kwargs"]["cache_mode"] == "Norm"
        assert call["key_cache"].data_ptr() == kc.data_ptr()
    if impl == "npu_scatter_nd_update_":
        assert call["self"].shape == (4, 16, 64) and call["self"].data_ptr() == kc.data_ptr()
        assert call["indices"].shape == (len(slots), 2)


def test_store_default_impl_and_empty_input():
    assert lowering.available_store_impl() == "npu_scatter_pa_kv_cache"
    kc = torch.randn(2, 16, 1, 16)
    with emu.recording() as calls:
        npu.store_kvcache(torch.randn(0, 1, 16), torch.randn(0, 1, 16), kc, kc.clone(),
                          torch.zeros(0, dtype=torch.int64))
    assert not calls


@pytest.mark.parametrize("present, expected", [
    ({("npu", "npu_scatter_pa_kv_cache"), ("atb", "_npu_reshape_and_cache")},
     "npu_scatter_pa_kv_cache"),
    ({("atb", "_npu_reshape_and_cache"), ("npu", "npu_scatter_nd_update_")},
     "_npu_reshape_and_cache"),
    ({("npu", "npu_scatter_nd_update_")}, "npu_scatter_nd_update_"),
    (set(), None),
])
def test_store_impl_preference_order(present, expected):
    lookup = lambda ns, name: object() if (ns, name) in present else None  # noqa: E731
    assert lowering.available_store_impl(lookup) == expected


# ---------------------------------------------------------------------------------------------
# The emulator is strict where the docs are (so the assertions above can fail)
# ---------------------------------------------------------------------------------------------

def test_emulator_rejects_the_documented_pitfalls():
    q, k, v, cq, ck, table = _prefill_inputs([4, 9], [130, 9], 4, 2, 128)
    fia = lowering.fia_op()
    common = dict(num_query_heads=4, num_key_value_heads=2, softmax_scale=0.1,
                  input_layout="TND", block_size=128, block_table=table, sparse_mode=3,
                  actual_seq_kvlen=[130, 9])
    mask = lowering.build_compressed_causal_mask(q)
    k3, v3 = k.flatten(2), v.flatten(2)
    with pytest.raises(emu.EmulatorError, match="1 = masked"):
        fia(q, k3, v3, atten_mask=~mask, actual_seq_qlen=[4, 13], **common)
    with pytest.raises(emu.EmulatorError, match="cumulative"):
        fia(q, k3, v3, atten_mask=mask, actual_seq_qlen=[4, 9], **common)
    good = fia(q, k3, v3, atten_mask=mask, actual_seq_qlen=[4, 13], **common)[0]
    misread = fia(q, k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
                  atten_mask=mask, actual_seq_qlen=[4, 13], **common)[0]
    assert torch.equal(good, misread)  # a (nb, Hkv, bs, D) cache is the documented 4-D layout
    kc = torch.randn(2, 16, 2, 16)
    with pytest.raises(emu.EmulatorError, match="PA_NZ"):
        torch.ops.npu.npu_scatter_pa_kv_cache(torch.randn(1, 2, 16), torch.randn(1, 2, 16), kc,
                                              kc.clone(), torch.tensor([3]))
    with pytest.raises(emu.EmulatorError, match="slot"):
        torch.ops.npu.npu_scatter_pa_kv_cache(torch.randn(1, 2, 16), torch.randn(1, 2, 16), kc,
                                              kc.clone(), torch.tensor([-1]), cache_mode="Norm")


def test_emulator_default_scale_is_one_and_empty_rows_are_poisoned():
    kc = torch.randn(2, 16, 1, 64, dtype=BF16)
    q = torch.randn(2, 1, 1, 64, dtype=BF16)
    out, _ = lowering.fia_op()(q, kc.flatten(2), kc.flatten(2), actual_seq_kvlen=[3, 0],
                               block_table=torch.tensor([[0], [1]], dtype=torch.int32),
                               num_query_heads=1, input_layout="BNSD", block_size=16)
    assert torch.isnan(out[1]).all()
    ref = reference.decode(q[:1, :, 0], kc, kc, torch.tensor([3], dtype=torch.int32),
                           torch.tensor([[0]], dtype=torch.int32), 1.0)
    assert_close(out[:1, :, 0], ref, *TOLERANCES[BF16])


# ---------------------------------------------------------------------------------------------
# What the backend says it can't serve, and the registry's use of it
# ---------------------------------------------------------------------------------------------

NPU = types.SimpleNamespace(type="npu")  # torch.device("npu") needs torch_npu to parse
PREFILL_OK = OpConfig("prefill", NPU, BF16, 128, 8, num_heads=32, paged=True, block_size=128)
DECODE_OK = OpConfig("decode", NPU, torch.float16, 64, 8, num_heads=32, paged=True, block_size=16)


@pytest.mark.parametrize("op, change, reason", [
    ("prefill", {}, None),
    ("prefill", dict(window_left=64), None),
    ("prefill", dict(device=torch.device("cpu")), "Ascend NPU"),
    ("prefill", dict(dtype=torch.float32), "fp16/bf16"),
    ("prefill", dict(dtype=torch.float16), "TND layout for bf16"),
    ("prefill", dict(head_dim=64), "head dim 128/192"),
    ("prefill", dict(softcap=30.0), "soft-capping"),
    ("prefill", dict(block_size=16), "block_size"),
    ("prefill", dict(num_heads=65 * 8), "query heads per kv head"),
    ("decode", {}, None),
    ("decode", dict(head_dim=72), "multiple of 16"),
    ("decode", dict(block_size=24), "block_size"),
    ("decode", dict(window_left=8), "sliding-window"),
    ("store_kvcache", dict(dtype=torch.float32), None),
    # issue 16: what FIA v2 would map to is said in each reason
    ("prefill", dict(has_sinks=True), "sink"),
    ("decode", dict(with_lse=True), None),  # FIA's softmax_lse
    ("prefill", dict(with_lse=True), None),
    ("decode", dict(cache_dtype=torch.float8_e4m3fn), "antiquant"),
    ("store_kvcache", dict(cache_dtype=torch.float8_e4m3fn), "float8_e4m3fn"),
    ("merge_states", {}, "merge_states"),
    # strided caches (a transposed [B, Hkv, S, D] cache): the lowering flattens them
    ("decode", dict(cache_contiguous=False), "not contiguous"),
    ("store_kvcache", dict(cache_contiguous=False), "not contiguous"),
])
def test_supports_reasons(op, change, reason):
    config = (PREFILL_OK if op == "prefill" else DECODE_OK).replace(op=op, **change)
    got = npu.supports(config)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


def test_registry_never_picks_npu_for_cpu_tensors():
    q = torch.randn(3, 4, 128, dtype=BF16)
    k = torch.randn(3, 2, 128, dtype=BF16)
    cu = cu_seqlens([3])
    with pytest.raises(registry.BackendUnavailable, match="Ascend NPU"):
        attn_ops.prefill(q, k, k, cu, cu, 3, 3, 0.1, backend="npu")
    # "auto" on a CPU: the pure-torch sdpa backend, never npu
    assert registry.select(PREFILL_OK.replace(device=torch.device("cpu"))).name == "sdpa"


def test_lowering_refuses_what_fia_cannot_do():
    with pytest.raises(ValueError, match="softcap"):
        lowering.prefill_spec(4, 2, 128, 0, 0.1, True, -1, 5.0)
    with pytest.raises(ValueError, match="window_left"):
        lowering.decode_spec(4, 2, 128, 16, 0.1, 3, 0.0)


def test_importing_the_backend_does_not_import_torch_npu(tmp_path):
    # A fresh interpreter where torch_npu is importable (a stand-in): a guarded import shows
    assert loaded_in_a_fresh_interpreter(["attn_ops", "attn_ops.backends.npu"],
                                         ("torch_npu", "torchair"), tmp_path) == []
