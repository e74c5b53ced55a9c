"""The Gluon Hopper decode against the reference backend (GPU): whole pairs, pieces merged by
their counters, programs that take several pairs; and what it serves (CPU): how TMA reads a
cache (cache_view, checked element by element), the layouts and shapes it refuses."""

import pytest
import torch

import attn_ops
from attn_ops.backends.triton import hopper_decode_launch as hd
from tests.support.helpers import TOLERANCES, assert_close, poisoned, random_paged

BF16 = torch.bfloat16


# ---------------------------------------------------------------------------------------------
# The plan's rule and the caches' views (CPU)
# ---------------------------------------------------------------------------------------------

def _flat(x, view):
    """The row matrix a cache_view describes, over x's storage."""
    shape, strides = view[:2]
    return torch.as_strided(x, shape, strides, x.storage_offset())


@pytest.mark.parametrize("layout", ["token-major", "heads-major", "token-major, padded rows"])
def test_cache_view_addresses_every_element(layout):
    blocks, page, heads, d = 3, 32, 4, 64
    if layout == "heads-major":  # SDPA's [B, Hkv, S, D], transposed
        x = torch.randn(blocks, heads, page, d).transpose(1, 2)
    elif layout == "token-major":
        x = torch.randn(blocks, page, heads, d)
    else:  # each token's row padded past the heads
        x = torch.randn(blocks, page, heads * d + 64)[..., :heads * d].view(blocks, page, heads, d)
    view = hd.cache_view(x)
    assert view is not None
    flat = _flat(x, view)
    per_block, per_head, cols = view[2:]
    for blk in range(blocks):
        for g in range(heads):
            rows = flat[blk * per_block + g * per_head:][:page, g * cols:g * cols + d]
            assert torch.equal(rows, x[blk, :, g]), (layout, blk, g)


def test_cache_view_refuses_what_tma_cannot_read():
    x = torch.randn(4, 16, 2, 64)
    assert hd.cache_view(x[:, :8]) is None  # pages of 8 keys
    assert hd.cache_view(x.transpose(0, 1).contiguous().transpose(0, 1)) is None  # laid apart
    assert hd.cache_view(torch.randn(4 * 16 * 2 * 64 + 1)[1:].view(4, 16, 2, 64)) is None
    rows_516 = torch.randn(4, 16, 129)[..., :128].view(4, 16, 2, 64)
    assert hd.cache_view(rows_516) is None  # 516-byte rows


def test_cache_reason_names_what_the_kernel_would_misread():
    paged = torch.randn(6, 16, 2, 64)
    one_column, two_columns = torch.zeros(3, 1, dtype=torch.int32), torch.zeros(3, 2,
                                                                                 dtype=torch.int32)
    assert hd.cache_reason(paged, paged, two_columns) is None
    assert hd.cache_reason(paged, paged.transpose(0, 1).contiguous().transpose(0, 1),
                           two_columns).startswith("hopper decode: caches of strides")
    pages_of_48 = torch.randn(6, 48, 2, 64)  # a 64-key tile would cross into the next page
    assert "page size 48" in hd.cache_reason(pages_of_48, pages_of_48, two_columns)
    assert hd.cache_reason(pages_of_48, pages_of_48, one_column) is None  # one page a sequence
    with pytest.raises(ValueError, match="page size 48"):
        hd.decode(torch.randn(3, 4, 64), pages_of_48, pages_of_48,
                  torch.ones(3, dtype=torch.int32), two_columns, 0.125)


# ---------------------------------------------------------------------------------------------
# Against the reference (GPU)
# ---------------------------------------------------------------------------------------------

def _gpu_only():
    if not hd.available():
        pytest.skip("needs an sm90 GPU and Gluon's Hopper API")


def _nan_past_lengths(cache, table, lens, page):
    """NaN in every slot of each sequence's blocks past its length (garbage a cache may hold)."""
    for b, n in enumerate(lens):
        for j in range(n, -(-n // page) * page):
            cache[table[b, j // page], j % page] = float("nan")


def _case(lens, h, hkv, d, page, dtype, layout, width=None):
    dev = "cuda"
    if layout == "heads-major":  # one block per sequence, SDPA's layout
        page = max(lens + [16])
        page = -(-page // 16) * 16
        k = torch.randn(len(lens), hkv, page, d, device=dev, dtype=dtype).transpose(1, 2)
        v = torch.randn(len(lens), hkv, page, d, device=dev, dtype=dtype).transpose(1, 2)
        table = torch.arange(len(lens), dtype=torch.int32, device=dev)[:, None]
    else:
        batch = random_paged(lens, hkv, d, page, dtype, dev, table_width=width)
        k, v, table = batch.k_cache, batch.v_cache, batch.block_table
    for cache in (k, v):
        _nan_past_lengths(cache, table, lens, page)
    q = torch.randn(len(lens), h, d, device=dev, dtype=dtype)
    return q, k, v, torch.tensor(lens, dtype=torch.int32, device=dev), table


CASES = [
    pytest.param([1, 13, 123, 300], 32, 8, 128, 16, BF16, "token-major", id="g4-p16-odd"),
    pytest.param([0, 64, 65, 5], 32, 8, 128, 64, BF16, "token-major", id="g4-p64-empty-edges"),
    pytest.param([200, 1000, 0], 32, 8, 128, 256, BF16, "token-major", id="g4-p256"),
    pytest.param([31, 32, 33], 8, 8, 64, 32, torch.float16, "token-major", id="g1-d64-p32"),
    pytest.param([90, 2000], 16, 2, 128, 16, BF16, "token-major", id="g8-p16"),
    pytest.param([384, 1, 0, 200], 32, 8, 128, 0, BF16, "heads-major", id="g4-one-block"),
    pytest.param([77, 129], 64, 1, 64, 0, torch.float16, "heads-major", id="g64-one-block"),
    # One long sequence among short ones: its pairs in pieces over many programs, merged.
    pytest.param([5000, 3, 0, 17, 64, 100, 1, 1], 32, 8, 128, 16, BF16, "token-major",
                 id="skewed-pieces"),
    pytest.param([4096, 0, 0, 0], 16, 2, 128, 64, BF16, "token-major", id="one-sequence-pieces"),
    # More pairs than programs (2 per SM): each program takes several pairs' tiles.
    pytest.param([(37 * b) % 301 for b in range(100)], 32, 8, 128, 16, BF16, "token-major",
                 id="b100-several-pairs-a-program"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("lens, h, hkv, d, page, dtype, layout", CASES)
def test_matches_reference(lens, h, hkv, d, page, dtype, layout):
    """Poisoned output, NaN in every cache slot past a sequence's length, garbage table
    entries past its blocks, empty sequences."""
    _gpu_only()
    q, k, v, seqlens, table = _case(lens, h, hkv, d, page, dtype, layout)
    scale = d ** -0.5
    expected = attn_ops.decode(q, k, v, seqlens, table, scale, backend="reference")
    out = hd.decode(q, k, v, seqlens, table, scale, out=poisoned(q.shape, dtype, "cuda"))
    assert_close(out, expected, *TOLERANCES[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("progs", [1, 7, 264, 1000])
def test_any_program_count_deals_the_same_attention(progs):
    """One program for the batch, fewer programs than pairs, every pair in pieces, more
    programs than tiles (some deal themselves nothing): the reference's output each time."""
    _gpu_only()
    q, k, v, seqlens, table = _case([700, 0, 64, 1900, 5], 32, 8, 128, 16, BF16, "token-major")
    expected = attn_ops.decode(q, k, v, seqlens, table, 128 ** -0.5, backend="reference")
    out = hd.decode(q, k, v, seqlens, table, 128 ** -0.5, out=poisoned(q.shape, BF16, "cuda"),
                    progs=progs)
    assert_close(out, expected, *TOLERANCES[BF16])


@pytest.mark.cuda
def test_an_int64_block_table_reads_the_same_blocks():
    """TMA takes int32 coordinates: an int64 table's entries are narrowed in the kernel."""
    _gpu_only()
    q, k, v, seqlens, table = _case([300, 45, 0, 1000], 32, 8, 128, 16, BF16, "token-major")
    out = hd.decode(q, k, v, seqlens, table.long(), 128 ** -0.5)
    assert torch.equal(out, hd.decode(q, k, v, seqlens, table, 128 ** -0.5))


@pytest.mark.cuda
def test_counters_are_left_zero_and_calls_repeat_exactly():
    """The merging piece resets its pair's counter: a second call (as a graph replay would
    make) merges alike, bit for bit, and the counters read zero after it."""
    _gpu_only()
    from attn_ops.backends.triton.split_counters import semaphores
    q, k, v, seqlens, table = _case([3000, 7, 900, 0, 1], 32, 8, 128, 16, BF16, "token-major")
    first = hd.decode(q, k, v, seqlens, table, 128 ** -0.5)
    second = hd.decode(q, k, v, seqlens, table, 128 ** -0.5)
    assert torch.equal(first, second)
    assert not semaphores(5 * 8, q.device)[:5 * 8].any()


def test_shape_reason_names_what_the_kernel_does_not_serve():
    q, cache, table = torch.randn(3, 32, 128), torch.randn(6, 16, 8, 128), torch.zeros(
        3, 2, dtype=torch.int32)
    assert hd.shape_reason(q.bfloat16(), cache.bfloat16(), table) is None
    assert "batch 129" in hd.shape_reason(torch.randn(129, 32, 128), cache, table)
    assert "groups of at most 64" in hd.shape_reason(torch.randn(3, 128, 128),
                                                     torch.randn(6, 16, 1, 128), table)
    assert "D 64 or 128" in hd.shape_reason(torch.randn(3, 32, 96), torch.randn(6, 16, 8, 96),
                                            table)
    assert "serves fp16 / bf16" in hd.shape_reason(q, cache, table)  # float32
    assert "key tiles a sequence" in hd.shape_reason(q.bfloat16(), cache.bfloat16(),
                                                     torch.zeros(3, 200000, dtype=torch.int32))
    with pytest.raises(ValueError, match="batch 129"):
        hd.decode(torch.randn(129, 32, 128).bfloat16(), cache.bfloat16(), cache.bfloat16(),
                  torch.ones(129, dtype=torch.int32), torch.zeros(129, 2, dtype=torch.int32),
                  0.125)


@pytest.mark.cuda
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_value_row_reaches_only_its_sequence(bad):
    """A NaN / Inf value row inside sequence 1 of KV head 0: the rows that see it (that
    sequence's group of head 0) are non-finite, every other row exact."""
    _gpu_only()
    lens = [70, 150, 33]
    q, k, v, seqlens, table = _case(lens, 32, 8, 128, 16, BF16, "token-major")
    v[table[1, 3], 5, 0] = bad  # key 53 of sequence 1, KV head 0
    out = hd.decode(q, k, v, seqlens, table, 128 ** -0.5)
    expected = attn_ops.decode(q, k, v, seqlens, table, 128 ** -0.5, backend="reference")
    hit = torch.zeros(out.shape[:2], dtype=torch.bool, device="cuda")
    hit[1, :4] = True
    assert (~torch.isfinite(out[hit])).all()
    assert_close(out[~hit], expected[~hit], *TOLERANCES[BF16])


# ---------------------------------------------------------------------------------------------
# The grid rule and the Triton backend's route
# ---------------------------------------------------------------------------------------------

def test_programs_one_per_pair_until_the_sms_are_full():
    sms = 132
    assert hd.programs(16, 8, sms, 8192) == 128  # one pair each, one per SM
    assert hd.programs(0, 8, sms) == 1  # a grid of one: it zeroes nothing and exits
    # past one per SM: short tables keep one pair each (two per SM on some SMs), long ones
    # take every SM twice, so no SM walks alone
    assert hd.programs(24, 8, sms, 2048) == 192 and hd.programs(24, 8, sms, 8192) == 264
    assert hd.programs(48, 8, sms, 2048) == 264  # past two per SM: tiles dealt over 264


def test_the_route_takes_plain_calls_of_0_75_to_2_pairs_per_sm(monkeypatch):
    from attn_ops.backends.triton import decode_plan
    monkeypatch.setattr(decode_plan, "INTERPRET", False)
    assert decode_plan.hopper_decode_applies(33, 8, 132)  # 264 pairs
    assert not decode_plan.hopper_decode_applies(34, 8, 132)
    assert decode_plan.hopper_decode_applies(13, 8, 132)  # 104 pairs, 0.79 per SM
    assert not decode_plan.hopper_decode_applies(12, 8, 132)  # 96: SMs would idle
    monkeypatch.setattr(decode_plan, "HOPPER_DECODE", False)
    assert not decode_plan.hopper_decode_applies(16, 8, 132)


def test_the_route_keeps_cpu_tensors_off_it():
    from attn_ops.backends.triton.decode_kernel import hopper_route
    q, cache = torch.randn(2, 8, 64, dtype=BF16), torch.randn(4, 64, 2, 64, dtype=BF16)
    assert not hopper_route(q, cache, cache, torch.zeros(2, 2, dtype=torch.int32))


@pytest.mark.cuda
@pytest.mark.parametrize("bound", [False, True], ids=["wrapper", "bound"])
def test_the_triton_backend_routes_plain_decodes_to_it(bound, monkeypatch):
    """A plain bf16 decode through the Triton backend's wrapper, and its per-signature
    function, goes to this kernel's decode / bind_decode (spied) and matches the reference; a
    call with sinks keeps the Triton kernels."""
    _gpu_only()
    from attn_ops.backends.triton import decode_kernel
    name = "bind_decode" if bound else "decode"
    calls, real = [], getattr(hd, name)
    monkeypatch.setattr(hd, name, lambda *a, **kw: calls.append(name) or real(*a, **kw))
    # 16 sequences x 8 KV heads: 128 pairs, within the route's 0.75-2 per SM on an H100 / H200
    lens = [300, 0, 4000, 17, 64] + [(37 * b) % 301 for b in range(11)]
    q, k, v, seqlens, table = _case(lens, 32, 8, 128, 16, BF16, "token-major")
    scale = 128 ** -0.5
    assert decode_kernel.hopper_route(q, k, v, table)
    expected = attn_ops.decode(q, k, v, seqlens, table, scale, backend="reference")
    if bound:
        run = decode_kernel.bind_decode(q, k, v, seqlens, table, scale)
        out = [run(q, k, v, seqlens, table, scale) for _ in range(2)][-1]
    else:
        out = decode_kernel.decode(q, k, v, seqlens, table, scale)
    assert calls == [name], "the Gluon decode was not taken"
    assert_close(out, expected, *TOLERANCES[BF16])
    sinks = torch.randn(32, device="cuda")
    assert not decode_kernel.hopper_route(q, k, v, table, sinks=sinks)


@pytest.mark.cuda
def test_a_cache_tma_cannot_read_keeps_the_triton_kernels():
    """Caches whose base is 2 bytes off 16: the wrapper routes them to the Triton kernels, and
    a function bound for aligned caches of the same signature falls back to the wrapper."""
    _gpu_only()
    from attn_ops.backends.triton import decode_kernel
    lens = [100, 37, 260, 0] * 4  # 128 pairs: on the route when the caches are aligned
    q, k, v, seqlens, table = _case(lens, 32, 8, 128, 16, BF16, "token-major")
    scale = 128 ** -0.5
    assert decode_kernel.hopper_route(q, k, v, table)
    shifted = [torch.empty(x.numel() + 1, dtype=BF16, device="cuda")[1:].view(x.shape)
               for x in (k, v)]
    for dst, src in zip(shifted, (k, v)):
        dst.copy_(src)
    assert not decode_kernel.hopper_route(q, *shifted, table)
    expected = attn_ops.decode(q, k, v, seqlens, table, scale, backend="reference")
    out = decode_kernel.decode(q, *shifted, seqlens, table, scale)
    assert_close(out, expected, *TOLERANCES[BF16])
    run = decode_kernel.bind_decode(q, k, v, seqlens, table, scale)
    assert_close(run(q, *shifted, seqlens, table, scale), expected, *TOLERANCES[BF16])


@pytest.mark.cuda
def test_a_captured_route_replays_new_lengths_and_tables():
    """``attn.decode`` on the Gluon route captured in a CUDA graph: replays with other lengths
    (zeros among them) and the table's rows dealt to other sequences read what the reference
    reads (the schedule comes from the lengths on the device; the counters are the graph's)."""
    _gpu_only()
    from attn_ops.backends.triton import decode_kernel
    lens = [(37 * b) % 301 + 1 for b in range(15)] + [2500]
    q, k, v, seqlens, table = _case(lens, 32, 8, 128, 16, BF16, "token-major")
    assert decode_kernel.hopper_route(q, k, v, table)
    scale, lens_in, table_in = 128 ** -0.5, seqlens.clone(), table.clone()

    def step():
        return attn_ops.decode(q, k, v, lens_in, table_in, scale, backend="triton")
    step()  # compiles, binds and zeroes the counters' slab outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0)).to("cuda")
    for replay in range(3):
        if replay:  # sequence i reads row perm[i], up to that row's keys
            lens_in.copy_(seqlens[perm] * replay // 3)
            table_in.copy_(table[perm])
        graph.replay()
        expected = attn_ops.decode(q, k, v, lens_in, table_in, scale, backend="reference")
        assert_close(out, expected, *TOLERANCES[BF16])
