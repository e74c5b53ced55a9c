"""The sdpa backend against the reference (and so the float64 oracle) on the contract's cases."""

import math

import pytest
import torch

import attn_ops
from attn_ops.backends import sdpa
from tests.support.helpers import TOLERANCES, assert_close, cu_seqlens, random_paged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens_q,lens_k,h,hkv,d,causal,window", [
    ([13], [13], 2, 2, 32, True, -1),
    ([1, 7, 13], [1, 7, 13], 4, 2, 64, True, -1),
    ([3, 0, 5], [8, 0, 5], 8, 2, 128, True, -1),   # lq < lk, an empty sequence
    ([123], [123], 4, 1, 64, False, -1),           # MQA, odd length
    ([6, 11], [9, 11], 4, 2, 32, True, 3),
    ([6, 11], [9, 11], 4, 2, 32, False, 0),
])
@pytest.mark.parametrize("paged", [False, True])
def test_prefill_matches_reference(dtype, lens_q, lens_k, h, hkv, d, causal, window, paged):
    q = torch.randn(sum(lens_q) + 2, h, d, dtype=dtype)  # 2 tail rows owned by no sequence
    if paged:
        pb = random_paged(lens_k, hkv, d, 4, dtype)
        k, v, table = pb.k_cache, pb.v_cache, pb.block_table
    else:
        k = torch.randn(sum(lens_k), hkv, d, dtype=dtype)
        v = torch.randn_like(k)
        table = None
    args = (q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k), d ** -0.5,
            causal, table, window, 0.0)
    got = attn_ops.prefill(*args, backend="sdpa")
    want = attn_ops.prefill(*args, backend="reference")
    assert got.dtype == dtype
    assert_close(got, want, *TOLERANCES[dtype])
    assert torch.equal(got[-2:], torch.zeros_like(got[-2:]))


@pytest.mark.parametrize("lens,h,hkv,bs,window", [
    ([1, 17, 0, 33], 4, 2, 8, -1), ([123, 5], 8, 1, 16, -1), ([9, 30], 4, 4, 4, 5), ([0, 0], 2, 1, 16, -1)])
def test_decode_matches_reference(lens, h, hkv, bs, window):
    pb = random_paged(lens, hkv, 64, bs, torch.float32, table_width=8)
    args = (torch.randn(len(lens), h, 64), pb.k_cache, pb.v_cache,
            torch.tensor(lens, dtype=torch.int32), pb.block_table, 0.125, window, 0.0)
    got = attn_ops.decode(*args, backend="sdpa")
    assert_close(got, attn_ops.decode(*args, backend="reference"), *TOLERANCES[torch.float32])
    for b, n in enumerate(lens):
        if n == 0:
            assert torch.equal(got[b], torch.zeros_like(got[b]))


def test_softcap_is_refused_with_a_reason():
    q = torch.randn(4, 2, 32)
    cu = cu_seqlens([4])
    with pytest.raises(attn_ops.BackendUnavailable, match="softcap is not expressible"):
        attn_ops.prefill(q, q, q, cu, cu, 4, 4, 0.1, True, None, -1, 5.0, backend="sdpa")


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("window", [-1, 3])
def test_traces_fullgraph_without_host_sync(backend, window):
    # fullgraph fails on a graph break, which .item(), .tolist() or `if tensor:` would cause;
    # window 3 takes the path that zeroes non-finite hidden keys.
    torch._dynamo.reset()
    from attn_ops.registry import get_backend_module
    module = get_backend_module(backend)
    pb = random_paged([5, 0], 2, 32, 4, torch.float32)
    args = (torch.randn(2, 4, 32), pb.k_cache, pb.v_cache, torch.tensor([5, 0], dtype=torch.int32),
            pb.block_table, 0.2, window)
    fn = torch.compile(module.decode, backend="aot_eager", fullgraph=True)
    assert_close(fn(*args), module.decode(*args), 1e-6, 1e-6)
    q, k = torch.randn(9, 4, 32), torch.randn(9, 2, 32)
    cu = cu_seqlens([4, 5])
    args = (q, k, k.clone(), cu, cu, 5, 5, 0.2, True, None, window)
    fn = torch.compile(module.prefill, backend="aot_eager", fullgraph=True)
    assert_close(fn(*args), module.prefill(*args), 1e-6, 1e-6)


# ---------------------------------------------------------------------------------------------
# The dense fast path: every sequence exactly max_seqlen long, SDPA on views of q/k/v
# ---------------------------------------------------------------------------------------------

_GATHERS = ("index_select", "gather", "aten::index", "searchsorted", "scatter", "masked_fill",
            "nan_to_num", "copy_", "clone", "bmm", "contiguous")


def _aten_ops(fn, d: int = 32):
    """``fn()`` and the aten ops it ran (profiler events, nested ones included) that touch a
    tensor with last dim ``d`` (q, k, v, the output or a tile of them; not a [Mq, Mk] mask),
    except those inside the finiteness check's ``aten::sum`` (on bf16/fp16 CPU tensors the
    reduction converts its input to fp32 internally: a temporary of the check, not a layout
    copy of q/k/v or the output)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        out = fn()

    def in_sum(e):
        while e is not None:
            if e.name == "aten::sum":
                return True
            e = e.cpu_parent
        return False
    return out, [e.name for e in prof.events()
                 if e.name.startswith("aten::") and (e.name == "aten::sum" or not in_sum(e))
                 and any(len(s) >= 3 and s[-1] == d for s in e.input_shapes)]


def _dense_inputs(b, mq, mk, h, hkv, d, dtype):
    """q/k/v as strided THD views of one packed projection, as a model's qkv split gives them
    (token stride (H + 2 Hkv) * D, a storage offset), random and never zero."""
    qkv = torch.randn(b * max(mq, mk), (h + 2 * hkv) * d).to(dtype)
    qkv = torch.where(qkv == 0, 0.5, qkv)
    width = (h + 2 * hkv) * d
    q = qkv[:b * mq, :h * d].view(b * mq, h, d)
    k = qkv[:b * mk, h * d:(h + hkv) * d].view(b * mk, hkv, d)
    v = qkv[:b * mk, (h + hkv) * d:].view(b * mk, hkv, d)
    assert k.stride(0) == v.stride(0) == width
    return q, k, v


_DENSE_CASES = [  # (B, mq, mk, H, Hkv, causal, window)
    (2, 13, 13, 4, 2, True, -1),    # square causal: is_causal
    (3, 13, 13, 4, 1, False, -1),   # MQA, no mask
    (2, 5, 13, 4, 2, True, -1),     # bottom-right causal: a mask
    (2, 13, 13, 4, 2, True, 3),     # window
    (2, 5, 13, 4, 2, False, 2),     # window without causality
    (1, 1, 7, 4, 4, True, -1),      # one query
    (1, 123, 123, 2, 1, True, -1),  # odd length past one kernel block
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,mq,mk,h,hkv,causal,window", _DENSE_CASES)
def test_dense_prefill_takes_views_and_matches_reference(dtype, b, mq, mk, h, hkv, causal,
                                                         window):
    d = 32
    q, k, v = _dense_inputs(b, mq, mk, h, hkv, d, dtype)
    args = (q, k, v, cu_seqlens([mq] * b), cu_seqlens([mk] * b), mq, mk, d ** -0.5, causal,
            None, window, 0.0)
    got = attn_ops.prefill(*args, backend="sdpa")
    # The fast path: the fused kernel on views, no gather / scatter / fix-up pass (the backend
    # alone: the op's data checks, on in the tests, read cu_seqlens through copies).
    got_backend, names = _aten_ops(lambda: sdpa.prefill(*args))
    assert torch.equal(got, got_backend)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert not [n for n in names if any(g in n for g in _GATHERS)], names
    want = attn_ops.prefill(*args, backend="reference")
    assert got.dtype == dtype and got.shape == q.shape
    assert got.is_contiguous()  # the strides the op's fake kernel promises
    assert_close(got, want, *TOLERANCES[dtype])


def test_dense_shapes_with_short_sequences_take_the_tiles():
    # Tq == B * max_seqlen_q, but the sequences are 2 and 2 long: rows 4..7 belong to no
    # sequence and must be zero (shapes alone cannot tell this batch from a dense one).
    q, k, v = _dense_inputs(2, 4, 4, 4, 2, 32, torch.float32)
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    args = (q, k, v, cu, cu, 4, 4, 0.2, True, None, -1, 0.0)
    got = attn_ops.prefill(*args, backend="sdpa")
    _, names = _aten_ops(lambda: sdpa.prefill(*args))
    assert "aten::index_select" in names
    assert_close(got, attn_ops.prefill(*args, backend="reference"), 2e-5, 2e-5)
    assert torch.equal(got[4:], torch.zeros_like(got[4:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mq,mk,window", [(13, 13, -1), (5, 13, -1), (13, 13, 3)])
@pytest.mark.parametrize("where,bad", [("k", float("nan")), ("v", float("nan")),
                                       ("k", float("inf")), ("v", float("-inf"))])
def test_dense_prefill_hides_non_finite_keys_and_values(dtype, mq, mk, window, where, bad):
    """A NaN/Inf in key or value 9 of sequence 1 reaches no row that does not see key 9 (nor
    sequence 0); rows that see a NaN come out NaN."""
    b, h, hkv, d = 2, 4, 2, 32
    q, k, v = _dense_inputs(b, mq, mk, h, hkv, d, dtype)
    (k if where == "k" else v)[mk + 9, 1, 5] = bad
    args = (q, k, v, cu_seqlens([mq] * b), cu_seqlens([mk] * b), mq, mk, d ** -0.5, True, None,
            window, 0.0)
    got = attn_ops.prefill(*args, backend="sdpa")
    want = attn_ops.prefill(*args, backend="reference")
    i = torch.arange(mq) + (mk - mq)  # the token each query row of a sequence is
    sees = (i >= 9) & ((i - window <= 9) if window >= 0 else True)
    rows = torch.cat([torch.zeros(mq, dtype=torch.bool), sees])  # sequence 0 sees nothing bad
    assert_close(got[~rows], want[~rows], *TOLERANCES[dtype], what="rows that don't see it")
    if math.isnan(bad):
        assert torch.isnan(got[rows][:, 2:]).all()  # query heads 2, 3 read kv head 1
    assert torch.isfinite(got[rows][:, :2]).all()   # heads 0, 1 (kv head 0) never see it


def test_dense_prefill_check_cost_is_one_sum_per_checked_tensor():
    # Square causal: only v is checked (the kernel overwrites hidden scores with -inf, so a
    # hidden key cannot leak); a mask (bottom-right, window) adds k.
    q, k, v = _dense_inputs(2, 13, 13, 4, 2, 32, torch.float32)
    cu = cu_seqlens([13, 13])
    for causal, window, sums in ((True, -1, 1), (False, -1, 0), (True, 3, 2)):
        _, names = _aten_ops(lambda: sdpa.prefill(q, k, v, cu, cu, 13, 13, 0.2, causal, None,
                                                  window))
        assert names.count("aten::sum") == sums, (causal, window, names)
