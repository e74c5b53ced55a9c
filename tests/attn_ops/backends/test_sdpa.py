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
    if math.isnan(bad) or where == "v":
        # query heads 2, 3 read kv head 1: a NaN, or a -inf value under a positive weight
        assert torch.isnan(got[rows][:, 2:]).all()
    # (An infinite key element gives a score of +inf or -inf by the sign of q's element: -inf
    # is a weight of exactly 0, so only isolation is promised there, not a NaN.)
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


# ---------------------------------------------------------------------------------------------
# The host decode: lengths and block ids read on the host, keys as a view or a block gather
# ---------------------------------------------------------------------------------------------

def _dense_as_paged(lens, hkv, d, dtype, s_max=None, first=1, step=2):
    """A dense cache viewed as paged: one block of ``s_max`` tokens per sequence, sequence b in
    block ``first + step * b`` (an arithmetic progression: the no-copy view), of a cache with
    spare blocks poisoned with NaN (never read). An empty sequence's entry is garbage."""
    b = len(lens)
    s_max = s_max or max(lens + [1])
    k_cache = torch.full((first + step * b + 1, s_max, hkv, d), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    table = torch.tensor([[first + step * i if n else -7] for i, n in enumerate(lens)],
                         dtype=torch.int32)
    for i in range(b):
        blk = first + step * i
        k_cache[blk] = _never_zero(s_max, hkv, d, dtype=dtype)
        v_cache[blk] = _never_zero(s_max, hkv, d, dtype=dtype)
    return k_cache, v_cache, table


def _never_zero(*shape, dtype=torch.float32):
    x = torch.randn(*shape)
    return torch.where(x == 0, 0.5, x).to(dtype)


def _decode_both(q, k_cache, v_cache, lens, table, window, dtype):
    seqlens = torch.tensor(lens, dtype=torch.int32)
    args = (q, k_cache, v_cache, seqlens, table, q.shape[-1] ** -0.5, window, 0.0)
    got = attn_ops.decode(*args, backend="sdpa")
    want = attn_ops.decode(*args, backend="reference")
    assert got.dtype == dtype and got.shape == q.shape
    return got, want, args


_HOST_CASES = [  # (lens, H, Hkv, window)
    ([13], 4, 4, -1),              # one sequence: no mask
    ([13, 13, 13], 8, 2, -1),      # equal lengths (gpt-fast's step): no mask, GQA
    ([13, 0, 123, 5], 8, 2, -1),   # a mask, an empty sequence, odd lengths
    ([123, 40], 4, 1, 7),          # MQA, a window: keys before it are hidden too
    ([9, 30, 1], 4, 2, 0),         # window 0: the last key only
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,h,hkv,window", _HOST_CASES)
@pytest.mark.parametrize("layout", ["dense_view", "pages_of_8", "one_block_gathered"])
def test_host_decode_matches_reference(dtype, lens, h, hkv, window, layout):
    d = 32
    if layout == "dense_view":
        k_cache, v_cache, table = _dense_as_paged(lens, hkv, d, dtype, s_max=max(lens) + 3)
    elif layout == "one_block_gathered":  # width 1, block ids in no progression: a gather
        k_cache, v_cache, table = _dense_as_paged(lens, hkv, d, dtype, s_max=max(lens) + 3)
        table = table.flip(0).contiguous()
        lens = lens[::-1]
    else:
        pb = random_paged(lens, hkv, d, 8, dtype, table_width=18)
        k_cache, v_cache, table = pb.k_cache, pb.v_cache, pb.block_table
    q = _never_zero(len(lens), h, d, dtype=dtype)
    got, want, _ = _decode_both(q, k_cache, v_cache, lens, table, window, dtype)
    assert_close(got, want, *TOLERANCES[dtype])
    for b, n in enumerate(lens):
        if n == 0:
            assert torch.equal(got[b], torch.zeros_like(got[b]))


def test_host_decode_takes_a_strided_query():
    # q a slice of a packed projection (token stride (H + 2 Hkv) * D): folding its heads is a
    # reshape, not a view
    lens, h, hkv, d = [13, 7], 4, 2, 32
    k_cache, v_cache, table = _dense_as_paged(lens, hkv, d, torch.float32)
    q = _never_zero(2, (h + 2 * hkv) * d)[:, :h * d].view(2, h, d)
    got, want, _ = _decode_both(q, k_cache, v_cache, lens, table, -1, torch.float32)
    assert_close(got, want, *TOLERANCES[torch.float32])


@pytest.mark.parametrize("layout", ["dense_view", "pages_of_8"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("window", [-1, 5])
def test_host_decode_keeps_hidden_non_finite_out(layout, bad, window):
    """NaN/Inf in every cache slot a sequence does not see (past its length, before its window,
    the rest of its last page, unowned pages): the output equals that of clean slots, finite."""
    lens, h, hkv, d = [13, 123, 1, 0], 4, 2, 32
    if layout == "dense_view":
        k_cache, v_cache, table = _dense_as_paged(lens, hkv, d, torch.float32, s_max=128)
        slot = lambda b, p: (int(table[b, 0]), p)  # noqa: E731
    else:
        pb = random_paged(lens, hkv, d, 8, torch.float32, table_width=16, spare_blocks=4)
        k_cache, v_cache, table = pb.k_cache, pb.v_cache, pb.block_table
        slot = lambda b, p: (int(table[b, p // 8]), p % 8)  # noqa: E731
    q = _never_zero(len(lens), h, d)
    clean, want, args = _decode_both(q, k_cache, v_cache, lens, table, window, torch.float32)
    seen = {slot(b, p) for b, n in enumerate(lens) for p in range(n)
            if window < 0 or p >= n - 1 - window}
    unseen = torch.ones(k_cache.shape[:2], dtype=torch.bool)
    for blk, p in seen:
        unseen[blk, p] = False
    assert int(unseen.sum()) > k_cache.shape[0]  # a test that can fail: hidden slots exist
    k_cache[unseen] = bad
    v_cache[unseen] = bad
    got = sdpa.decode(*args)
    assert_close(got, want, *TOLERANCES[torch.float32], what="hidden non-finite keys")
    assert_close(got, clean, 1e-6, 1e-6, what="against clean hidden slots")
    assert torch.equal(got[3], torch.zeros_like(got[3]))


@pytest.mark.parametrize("layout", ["dense_view", "pages_of_8"])
def test_host_decode_rows_that_see_nan_are_nan(layout):
    lens, h, hkv, d = [13, 30], 4, 2, 32
    if layout == "dense_view":
        k_cache, v_cache, table = _dense_as_paged(lens, hkv, d, torch.float32)
        where = (int(table[1, 0]), 20)
    else:
        pb = random_paged(lens, hkv, d, 8, torch.float32)
        k_cache, v_cache, table = pb.k_cache, pb.v_cache, pb.block_table
        where = (int(table[1, 2]), 4)
    k_cache[where][1, 3] = float("nan")  # sequence 1, token 20, kv head 1: a NaN score
    v_cache[where][0, 5] = float("nan")  # kv head 0: column 5 of its weighted sum
    q = _never_zero(2, h, d)
    got = sdpa.decode(q, k_cache, v_cache, torch.tensor(lens, dtype=torch.int32), table, 0.2)
    assert torch.isnan(got[1, 2:]).all()          # query heads 2, 3 read kv head 1
    assert torch.isnan(got[1, :2, 5]).all()       # heads 0, 1 (kv head 0): the NaN value's column
    got[1, :2, 5] = 0.0
    assert torch.isfinite(got[1, :2]).all() and torch.isfinite(got[0]).all()


def test_host_decode_gathers_into_one_kept_buffer(monkeypatch):
    """Over scattered pages the K and V blocks land in one buffer the thread keeps (a fresh
    multi-MB tile per call was page-faulted in on every call in some processes): calls of other
    shapes and windows reuse it and stay exact (the hidden spans a call zeroes are its own), a
    gather past the kept size allocates per call, and so does one that autograd must see."""
    monkeypatch.setattr(sdpa, "_gathered", __import__("threading").local())
    cases = [([13, 0, 123, 5], -1), ([40, 17], 3), ([123, 40, 9], -1), ([13, 0, 123, 5], 0)]
    addresses = []
    for lens, window in cases:
        pb = random_paged(lens, 2, 32, 8, torch.float32, table_width=18)
        q = _never_zero(len(lens), 4, 32)
        got, want, _ = _decode_both(q, pb.k_cache, pb.v_cache, lens, pb.block_table, window,
                                    torch.float32)
        assert_close(got, want, *TOLERANCES[torch.float32], what=f"lens {lens}, window {window}")
        addresses.append(sdpa._gathered.buf.data_ptr())
    assert len(set(addresses)) == 1  # the first call's: the largest gather of the four
    kept = sdpa._gathered.buf
    monkeypatch.setattr(sdpa, "_GATHER_KEPT_BYTES", 1024)  # every gather above: too large
    pb = random_paged([123, 40], 2, 32, 8, torch.float32, table_width=18)
    q = _never_zero(2, 4, 32)
    got, want, _ = _decode_both(q, pb.k_cache, pb.v_cache, [123, 40], pb.block_table, -1,
                                torch.float32)
    assert_close(got, want, *TOLERANCES[torch.float32])
    assert sdpa._gathered.buf is kept
    monkeypatch.setattr(sdpa, "_GATHER_KEPT_BYTES", 64 << 20)
    k_cache = pb.k_cache.clone().requires_grad_()
    ids = pb.block_table[:, :2].reshape(-1).clamp(min=0)
    gathered = sdpa._gather_blocks((k_cache, pb.v_cache), ids)
    assert gathered[0].requires_grad  # not written into the kept buffer (out= has no autograd)
    assert gathered[0].data_ptr() != kept.data_ptr()


def test_host_decode_reads_a_dense_cache_without_a_gather():
    """Where the block table reads one block per sequence at ids in progression (a dense cache
    viewed as paged: what the cache substitution emits), the keys are a view of the cache: no
    gather, no copy; a paged cache is gathered by whole blocks (2 index_select, [B * blocks]
    ids), never token by token."""
    def ops_of(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    record_shapes=True) as prof:
            fn()
        return [(e.name, e.input_shapes) for e in prof.events() if e.name.startswith("aten::")]

    lens, h, hkv, d = [13, 13], 8, 2, 32
    k_cache, v_cache, table = _dense_as_paged(lens, hkv, d, torch.float32, s_max=64)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    q = _never_zero(2, h, d)
    names = [n for n, _ in ops_of(lambda: sdpa.decode(q, k_cache, v_cache, seqlens, table, 0.2))]
    assert not [n for n in names if any(g in n for g in _GATHERS + ("copy", "where"))], names
    assert "aten::scaled_dot_product_attention" in names
    pb = random_paged([13, 123], hkv, d, 8, torch.float32)
    seqlens = torch.tensor([13, 123], dtype=torch.int32)
    events = ops_of(lambda: sdpa.decode(q, pb.k_cache, pb.v_cache, seqlens, pb.block_table, 0.2))
    gathers = [shapes for n, shapes in events if n == "aten::index_select"]
    assert len(gathers) == 2, events
    assert all(s[0] == list(pb.k_cache.shape) and s[2] == [2 * 16] for s in gathers), gathers
    assert not [n for n, _ in events if n in ("aten::gather", "aten::index")]


def test_host_decode_is_off_under_compile_and_for_tensor_subclasses():
    # A traced call must not read lengths on the host (the fake kernel runs there): the fast
    # path declines and the tiles run, sync-free (test_traces_fullgraph_without_host_sync).
    from torch._subclasses.fake_tensor import FakeTensorMode
    k_cache, v_cache, table = _dense_as_paged([5], 2, 32, torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        q = mode.from_tensor(torch.randn(1, 4, 32))
        seqlens = mode.from_tensor(torch.tensor([5], dtype=torch.int32))
        assert sdpa._host_decode(q, k_cache, v_cache, seqlens, table, 0.2, -1) is None
