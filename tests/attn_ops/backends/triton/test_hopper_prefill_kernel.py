"""The Gluon Hopper prefill kernel against the reference backend (GPU) through its three
entries (the kernel, the guarded entry, the guarded entry bound to a call signature), and its
static surface (CPU): supports() reasons, available() off sm90."""

import math

import pytest
import torch

from attn_ops.backends import reference
from attn_ops.backends.triton import hopper_prefill_launch as hp
from attn_ops.backends.triton import launch
from tests.support.helpers import TOLERANCES, assert_close, cu_seqlens, random_paged


def test_supports_serves_the_plain_call_and_a_paged_prefix():
    assert hp.supports(torch.bfloat16, 128) is None
    assert hp.supports(torch.float16, 64, causal=False) is None
    for page in (16, 32, 64, 128, 256, 1024):
        assert hp.supports(torch.bfloat16, 128, page_size=page) is None, page
    # sinks and the lse: the rows' finish
    assert hp.supports(torch.bfloat16, 128, sinks=True, return_lse=True) is None


@pytest.mark.parametrize("kwargs, word", [
    (dict(q_dtype=torch.float32), "dtype"), (dict(head_dim=96), "head_dim"),
    (dict(head_dim=256), "head_dim"), (dict(page_size=8), "page size"),
    (dict(page_size=48), "page size"),
    (dict(window_left=0), "window"), (dict(softcap=30.0), "softcap"), (dict(fp8=True), "fp8")])
def test_supports_refuses_with_a_reason(kwargs, word):
    args = dict(q_dtype=torch.bfloat16, head_dim=128)
    args.update(kwargs)
    reason = hp.supports(**args)
    assert isinstance(reason, str) and word in reason


def test_not_available_off_sm90():
    assert hp.available("cpu") is False
    if not torch.cuda.is_available():
        assert hp.available() is False


def _gpu_only():
    if not hp.available():
        pytest.skip("needs an sm90 GPU and Gluon's Hopper API")


ENTRIES = [pytest.param("prefill", id="kernel"), pytest.param("prefill_guarded", id="guarded"),
           pytest.param("bound", id="bound")]
# Consumer warpgroups per program: one (two programs per SM, 64-row items: the rule's choice
# for short causal prompts) or two (128-row items), forced whatever the rule would pick.
CONSUMERS = [pytest.param(1, id="solo"), pytest.param(2, id="duo")]


def _run(lens_q, lens_k, h, hkv, d, causal, dtype, extra_rows=0, nan_rows=(),
         entry="prefill_guarded", bad=float("nan"), kv_head=None, n_consumers=None, pack=None,
         sinks=False, lse=False):
    """Random never-zero inputs; ``out`` poisoned with NaN; checks against the reference, with
    ``nan_rows`` (key rows) of v set to ``bad`` (NaN or +-Inf; in KV head ``kv_head`` only,
    or all): only query rows that see them may turn non-finite. ``n_consumers``, ``pack``:
    forced (None: the launcher's rules). ``sinks``: random per-head sink logits (a strided
    view); ``lse``: the lse output too (poisoned likewise where the entry takes it)."""
    dev = "cuda"
    tq, tk = sum(lens_q) + extra_rows, sum(lens_k)
    q = torch.randn(tq, h, d, device=dev).to(dtype)
    k = torch.randn(tk, hkv, d, device=dev).to(dtype)
    v = (torch.rand(tk, hkv, d, device=dev) + 0.5).to(dtype)
    for r in nan_rows:
        v[r, slice(None) if kv_head is None else kv_head] = bad
    cq, ck = cu_seqlens(lens_q, dev), cu_seqlens(lens_k, dev)
    scale = d ** -0.5
    sink = (torch.randn(2 * h, device=dev) * 2)[::2] if sinks else None
    expected = reference.prefill(q, k, v, cq, ck, max(lens_q), max(lens_k), scale, causal,
                                 sinks=sink, return_lse=lse)
    if lse:
        expected, expected_lse = expected
    out = torch.full_like(q, float("nan"))
    out_lse = torch.full(q.shape[:2], float("nan"), device=dev)
    args = (q, k, v, cq, ck, max(lens_q), max(lens_k), scale, causal)
    extras = {}
    if sinks or lse:
        extras = dict(sinks=sink, return_lse=lse)
    if entry == "bound":  # bind_prefill_guarded: its second call takes the pinned launchers
        run = hp.bind_prefill_guarded(*args, n_consumers=n_consumers, pack=pack, **extras)
        call = args + (None, -1, 0.0, sink, None, None, lse)  # as the dispatch memo calls it
        run(*call)
        del out  # poison: the caching allocator hands this block to the next output
        raw = launch.stats["raw"]
        got = run(*call)
        # q at another address: its descriptor encoded anew, k's and v's kept (raw_launch).
        torch.testing.assert_close(run(q.clone(), *call[1:]), got, rtol=0, atol=0,
                                   equal_nan=True)
        assert launch.stats["raw"] == raw + 4, "both launches of both calls through raw_launch"
    elif entry == "prefill":  # the kernel alone: sinks and the lse given as tensors
        got = hp.prefill(*args, out=out, n_consumers=n_consumers, pack=pack, sinks=sink,
                         lse=out_lse if lse else None)
        assert got.data_ptr() == out.data_ptr()
        if lse:
            got = (got, out_lse)
    else:
        got = hp.prefill_guarded(*args, out=out, n_consumers=n_consumers, pack=pack,
                                 lse=out_lse if lse else None, **extras)
        assert (got[0] if lse else got).data_ptr() == out.data_ptr()
    atol, rtol = TOLERANCES[dtype]
    if lse:
        # -inf exactly where a row sees no key; NaN exactly where the reference has it (with
        # hidden keys, a row that sees a non-finite value: reference.poison_rows; the fixup
        # rewrites those rows, softmax.lse_of_output); never a poisoned row left unwritten
        got, got_lse = got
        nan = torch.isnan(expected_lse)
        assert torch.equal(torch.isnan(got_lse), nan), "NaN lse rows differ"
        assert_close(got_lse[~nan], expected_lse[~nan], 2e-3, 1e-3, what="lse")
    if nan_rows:
        # A row that sees an infinite value is NaN here (the isolation's rule, the FA2-style
        # kernel's) where the reference may give +-Inf; NaN values give NaN in both.
        seen = ~torch.isfinite(expected)
        assert seen.any(), "the test must have rows that see a non-finite value"
        if math.isnan(bad):
            assert torch.equal(torch.isnan(got), seen), "NaN rows differ"
        assert torch.equal(~torch.isfinite(got), seen), "non-finite rows differ"
        assert_close(got[~seen], expected[~seen], atol, rtol)
    else:
        assert_close(got, expected, atol, rtol)


@pytest.mark.cuda
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("h, hkv", [(32, 8), (8, 8)])
@pytest.mark.parametrize("n", CONSUMERS)
def test_odd_lengths(dtype, causal, h, hkv, entry, n):
    _gpu_only()
    _run([13, 123, 1000], [13, 123, 1000], h, hkv, 128, causal, dtype, entry=entry,
         n_consumers=n)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", CONSUMERS)
def test_varlen_with_an_empty_sequence_and_tail_rows(causal, n):
    _gpu_only()
    _run([13, 0, 300, 5], [13, 0, 300, 5], 8, 2, 128, causal, torch.bfloat16, extra_rows=77,
         n_consumers=n)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("entry", ENTRIES[1:])
@pytest.mark.parametrize("n", CONSUMERS)
def test_last_tiles_of_at_most_64_rows(causal, entry, n):
    """A last tile of at most 64 rows (64, 1, 192, 129 queries) leaves the second warpgroup no
    row: it passes the item's ring slots without computing, and must neither write nor hold
    up the first. 65 and 193 give it one row. NaN value rows: key 10 of the second sequence
    (seen by its rows from 10 on, or all of them) and the first key of the third, which the
    second's last tile reads past its end. (With one consumer the same lengths end items of
    64 rows exactly, or of one.)"""
    _gpu_only()
    lens = [64, 65, 1, 192, 193, 129]
    _run(lens, lens, 16, 4, 128, causal, torch.bfloat16, extra_rows=3,
         nan_rows=[64 + 10, 64 + 65], entry=entry, n_consumers=n)


@pytest.mark.cuda
@pytest.mark.parametrize("n", CONSUMERS)
def test_bottom_right_causal_with_more_keys(n):
    _gpu_only()
    _run([100, 37, 250], [300, 37, 251], 32, 8, 128, True, torch.bfloat16, n_consumers=n)


@pytest.mark.cuda
@pytest.mark.parametrize("n", CONSUMERS)
def test_a_sequence_without_keys_gives_zeros(n):
    _gpu_only()
    _run([100, 37, 250], [0, 77, 251], 8, 8, 128, False, torch.float16, n_consumers=n)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", CONSUMERS)
@pytest.mark.parametrize("lens", [[13, 123, 1000], [13, 123, 400]])
def test_head_dim_64(causal, n, lens):
    """With one consumer: 128-key steps past 512 keys, 64-key steps up to them."""
    _gpu_only()
    _run(lens, lens, 16, 4, 64, causal, torch.bfloat16, n_consumers=n)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("n", CONSUMERS)
def test_nan_values_reach_only_the_rows_that_see_them(causal, entry, n, request):
    """Key 200 of sequence 0 is hidden from its rows 0..199 by causality; rows 0..19 of
    sequence 1 sit right after sequence 0's last tile (sequence 0: 250 keys, not a multiple of
    the tile) and must not leak into it. The kernel alone leaks them (0 * NaN in P V: strict
    xfail); the guarded entry point, the backend's, does not (its fixup launch rewrites the
    flagged rows)."""
    if entry == "prefill":
        if not causal:
            pytest.skip("the kernel alone promises nothing here; the guarded entry is tested")
        request.applymarker(pytest.mark.xfail(
            strict=True, reason="0 * NaN: the kernel alone does not isolate"))
    _gpu_only()
    _run([250, 130], [250, 130], 8, 2, 128, causal, torch.bfloat16,
         nan_rows=[200] + list(range(250, 270)), entry=entry, n_consumers=n)


@pytest.mark.cuda
@pytest.mark.parametrize("entry", ENTRIES[1:])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
@pytest.mark.parametrize("n", CONSUMERS)
def test_infinite_values_reach_only_the_rows_that_see_them(entry, bad, n):
    """As the NaN test above, with +-Inf: ``0 * Inf`` is NaN, so the kernel's hidden rows leak
    the same way and the fixup must rewrite them; rows that see the value are not finite."""
    _gpu_only()
    _run([250, 130], [250, 130], 8, 2, 128, True, torch.bfloat16,
         nan_rows=[200] + list(range(250, 270)), entry=entry, bad=bad, n_consumers=n)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n", CONSUMERS)
def test_leaks_in_many_items_of_every_program(causal, d, n):
    """Twelve sequences of 64-1100 queries on 32 query heads: far more items than SMs, so the
    fixup's programs each scan many flags, and NaN value rows in one KV head only (its 4 query
    heads leak, the other 28 must stay untouched) at a hidden position of every sequence and
    at the start of each next one (read past a tile's end). fp16, padding rows."""
    _gpu_only()
    lens = [300, 1100, 517, 999, 640, 333, 1024, 129, 700, 64, 865, 431]
    starts = [sum(lens[:i]) for i in range(len(lens))]
    rows = [s + n // 2 for s, n in zip(starts, lens)] + starts[1:]
    _run(lens, lens, 32, 8, d, causal, torch.float16, extra_rows=9, nan_rows=rows,
         kv_head=5, n_consumers=n)


@pytest.mark.cuda
@pytest.mark.parametrize("n", CONSUMERS)
def test_the_kernel_flags_exactly_the_rows_that_are_not_finite(n):
    """The leak of the test above, through the kernel alone: every flag is written (poisoned
    before), 1 exactly when one of its rows below the sequence's length came out non-finite,
    else 0; a clean call writes every flag 0. The padding rows (5 past the last sequence) and
    the padding column ``B`` have flags too. Items of ``n * 64`` rows; a flag per consumer
    warpgroup (64 rows) with two consumers, per warp (16 rows) with one."""
    _gpu_only()
    lens, h, hkv, d, dev = [250, 130], 8, 2, 128, "cuda"
    q = torch.randn(sum(lens) + 5, h, d, device=dev).to(torch.bfloat16)
    k = torch.randn(sum(lens), hkv, d, device=dev).to(torch.bfloat16)
    v = (torch.rand(sum(lens), hkv, d, device=dev) + 0.5).to(torch.bfloat16)
    v[[200] + list(range(250, 270))] = float("nan")
    cu = cu_seqlens(lens, dev)
    shape = hp.flags_shape(max(lens), len(lens), h, n)
    clean = torch.full(shape, -7, dtype=torch.int32, device=dev)
    hp.prefill(q, k, v.nan_to_num(), cu, cu, max(lens), max(lens), d ** -0.5, True, flags=clean,
               n_consumers=n)
    assert torch.equal(clean, torch.zeros_like(clean)), "finite values: every flag written 0"
    flags = torch.full(shape, -7, dtype=torch.int32, device=dev)
    out = hp.prefill(q, k, v, cu, cu, max(lens), max(lens), d ** -0.5, True,
                     out=torch.full_like(q, float("nan")), flags=flags, n_consumers=n)
    bad = ~torch.isfinite(out.float()).all(-1)  # [T, H]
    want = torch.zeros_like(flags)
    tile, rows = n * 64, 64 if n == 2 else 16
    assert flags.shape[3] == tile // rows
    for g in range(flags.shape[0]):
        for seq, lq in enumerate(lens):
            for w in range(tile // rows):
                m0 = (-(-lq // tile) - 1 - g) * tile + w * rows
                lo, hi = max(m0, 0) + sum(lens[:seq]), min(m0 + rows, lq) + sum(lens[:seq])
                if m0 >= 0 and lo < hi:
                    want[g, seq, :, w] = bad[lo:hi].any(0).int()
    assert torch.equal(flags, want)
    assert int(flags.sum()) > 0, "the leak must be flagged"


def _poison_unused_rows_of_last_pages(paged, lens_k, page, keys=True):
    """NaN in V (and K, with ``keys``) of the rows past each sequence's keys in its last page:
    masked, so only the guard (flags + fixup) keeps their ``0 * NaN`` out."""
    for b, n in enumerate(lens_k):
        if n % page:
            last = int(paged.block_table[b, n // page])
            if keys:
                paged.k_cache[last, n % page:] = float("nan")
            paged.v_cache[last, n % page:] = float("nan")


@pytest.mark.cuda
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("page", [16, 64, 256])
@pytest.mark.parametrize("n_consumers", CONSUMERS)
def test_paged_prefix(page, causal, entry, n_consumers):
    """Queries over a paged cache holding a prefix (more keys than queries: bottom-right causal),
    odd lengths, an empty sequence, GQA, blocks in random order, garbage table entries past each
    sequence's pages. Through the guarded entries, NaN in the unused rows of each sequence's
    last page: those rows are masked, so only the guard (flags + fixup) keeps their ``0 * NaN``
    out. The kernel alone, on finite caches: exact, and no flag raised."""
    _gpu_only()
    torch.manual_seed(0)
    dev, h, hkv, d, dtype = "cuda", 16, 4, 128, torch.bfloat16
    lens_q, lens_k = [13, 0, 300, 128], [213, 37, 817, 128]
    paged = random_paged(lens_k, hkv, d, page, dtype, dev)
    if entry != "prefill":
        _poison_unused_rows_of_last_pages(paged, lens_k, page)
    q = torch.randn(sum(lens_q) + 5, h, d, device=dev).to(dtype)
    cq, ck = cu_seqlens(lens_q, dev), cu_seqlens(lens_k, dev)
    args = (q, paged.k_cache, paged.v_cache, cq, ck, max(lens_q), max(lens_k), d ** -0.5,
            causal, paged.block_table)
    expected = reference.prefill(*args)
    assert not torch.isnan(expected).any()
    if entry == "bound":
        run = hp.bind_prefill_guarded(*args, n_consumers=n_consumers)
        run(*args)
        got = run(*args)
    elif entry == "prefill":
        flags = torch.full(hp.flags_shape(max(lens_q), len(lens_q), h, n_consumers), 5,
                           dtype=torch.int32, device=dev)
        got = hp.prefill(*args, out=torch.full_like(q, float("nan")), flags=flags,
                         n_consumers=n_consumers)
        assert torch.equal(flags, torch.zeros_like(flags)), "finite caches: every flag 0"
    else:
        got = hp.prefill_guarded(*args, out=torch.full_like(q, float("nan")),
                                 n_consumers=n_consumers)
    assert_close(got, expected, *TOLERANCES[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("page", [0, 16])
@pytest.mark.parametrize("n", CONSUMERS)
def test_min_q_leaves_short_sequences_and_writes_every_flag(page, n):
    """The split route's half (``min_q``): items only for the sequences of more than ``min_q``
    queries (compacted: found per item among the others), their rows exact; the short
    sequences' rows untouched (poisoned before), the rows past the last sequence zero, every
    flag written 0 (poisoned before) on finite inputs, and 37 sequences (two steps of the
    sequence search)."""
    _gpu_only()
    torch.manual_seed(1)
    dev, h, hkv, d, dtype, min_q = "cuda", 8, 2, 128, torch.bfloat16, 4
    lens_q = [3, 200, 0, 4, 130, 1] + [2, 5] * 15 + [129]
    lens_k = [n + 40 for n in lens_q]
    q = torch.randn(sum(lens_q) + 7, h, d, device=dev).to(dtype)
    cq, ck = cu_seqlens(lens_q, dev), cu_seqlens(lens_k, dev)
    if page:
        paged = random_paged(lens_k, hkv, d, page, dtype, dev)
        kv = (paged.k_cache, paged.v_cache)
        tail = (paged.block_table,)
    else:
        kv = tuple(torch.randn(sum(lens_k), hkv, d, device=dev).to(dtype) for _ in range(2))
        tail = (None,)
    args = (q, *kv, cq, ck, max(lens_q), max(lens_k), d ** -0.5, True, *tail)
    flags = torch.full(hp.flags_shape(max(lens_q), len(lens_q), h, n), 9, dtype=torch.int32,
                       device=dev)
    got = hp.prefill(*args, out=torch.full_like(q, float("nan")), flags=flags, min_q=min_q,
                     n_consumers=n)
    expected = reference.prefill(*args)
    starts = cq.tolist()
    for b, n in enumerate(lens_q):
        rows = slice(starts[b], starts[b + 1])
        if n > min_q:
            assert_close(got[rows], expected[rows], *TOLERANCES[dtype], what=f"sequence {b}")
        else:
            assert torch.isnan(got[rows].float()).all(), f"sequence {b} is another kernel's"
    assert torch.equal(got[starts[-1]:], torch.zeros_like(got[starts[-1]:]))
    assert torch.equal(flags, torch.zeros_like(flags)), "every flag written, 0"


# The packed form (few queries per sequence: an item is a chunk of 64 / PACK tokens of the PACK
# query heads that share a KV head), forced whatever the rule would pick: PACK 4 at G = 4 and at
# G = 8 (two items per KV head), PACK 2 at G = 2 (chunks of 32 tokens).
PACKS = [pytest.param(32, 8, 4, id="G4"), pytest.param(64, 8, 4, id="G8"),
         pytest.param(16, 8, 2, id="G2")]


def _few(pack, seed=0):
    """Query lengths up to a chunk (64 / pack), one empty, and key lengths past them (a
    prefix: bottom-right causal), odd."""
    g = torch.Generator().manual_seed(seed)
    tok = 64 // pack
    lens_q = [int(x) for x in torch.randint(1, tok + 1, (21,), generator=g)] + [0, tok, 1]
    lens_k = [n + int(x) for n, x in zip(lens_q, torch.randint(0, 700, (24,), generator=g))]
    return lens_q, lens_k


@pytest.mark.cuda
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("h, hkv, pack", PACKS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [64, 128])
def test_packed_few_queries(entry, h, hkv, pack, causal, d):
    """Dense K/V (a tile's tail holds the next sequence's keys), padding rows past the last
    sequence, an empty sequence, a sequence of one whole chunk."""
    _gpu_only()
    torch.manual_seed(0)
    lens_q, lens_k = _few(pack)
    _run(lens_q, lens_k, h, hkv, d, causal, torch.bfloat16, extra_rows=5, entry=entry,
         pack=pack)


@pytest.mark.cuda
@pytest.mark.parametrize("entry", ENTRIES[1:])
@pytest.mark.parametrize("h, hkv, pack", PACKS)
def test_packed_nan_values_reach_only_the_rows_that_see_them(entry, h, hkv, pack):
    """A NaN value two keys before the end of sequence 0 (seen by its last two queries only,
    hidden from the others in the same tile) and one in sequence 1's first key (read past
    sequence 0's last tile): the kernel leaks both through ``0 * NaN``; the guard's fixup
    rewrites them."""
    _gpu_only()
    torch.manual_seed(0)
    tok = 64 // pack
    lens_q, lens_k = [tok, 5, 3, 1], [300, 77, 200, 40]
    _run(lens_q, lens_k, h, hkv, 128, True, torch.bfloat16, extra_rows=2,
         nan_rows=[298, 301, 380], entry=entry, pack=pack)


@pytest.mark.cuda
@pytest.mark.parametrize("h, hkv, pack", PACKS)
def test_packed_flags_are_the_one_consumer_flags(h, hkv, pack):
    """Every flag of the one-consumer layout is written (poisoned before), by exactly the item
    whose chunk holds its rows: 1 where one of its rows came out non-finite, else 0, and all 0 on
    finite values. Max 2 x 64 + 5 queries, so flag tiles past some sequences' last."""
    _gpu_only()
    torch.manual_seed(2)
    dev, d = "cuda", 128
    lens_q, lens_k = [13, 7, 1, 0, 11], [133, 20, 64, 9, 300]
    tq = sum(lens_q) + 3
    q = torch.randn(tq, h, d, device=dev).to(torch.bfloat16)
    k = torch.randn(sum(lens_k), hkv, d, device=dev).to(torch.bfloat16)
    v = (torch.rand(sum(lens_k), hkv, d, device=dev) + 0.5).to(torch.bfloat16)
    cq, ck = cu_seqlens(lens_q, dev), cu_seqlens(lens_k, dev)
    max_q = 64 * 2 + 5  # flag tiles past every sequence's last: the modulo's wrap
    shape = hp.flags_shape(max_q, len(lens_q), h, 1)
    args = (q, k, v, cq, ck, max_q, max(lens_k), d ** -0.5, True)
    clean = torch.full(shape, -7, dtype=torch.int32, device=dev)
    hp.prefill(*args, flags=clean, pack=pack)
    assert torch.equal(clean, torch.zeros_like(clean)), "finite values: every flag written 0"
    v[[131, 150, 440]] = float("nan")  # seq 0's 131 (hidden from its first rows), 1's first...
    flags = torch.full(shape, -7, dtype=torch.int32, device=dev)
    out = hp.prefill(q, k, v, *args[3:], out=torch.full_like(q, float("nan")), flags=flags,
                     pack=pack)
    bad = ~torch.isfinite(out.float()).all(-1)  # [T, H]
    want = torch.zeros_like(flags)
    for g in range(shape[0]):
        for seq, lq in enumerate(lens_q):
            for w in range(4):
                m0 = (-(-lq // 64) - 1 - g) * 64 + w * 16
                lo, hi = max(m0, 0) + sum(lens_q[:seq]), min(m0 + 16, lq) + sum(lens_q[:seq])
                if m0 >= 0 and lo < hi:
                    want[g, seq, :, w] = bad[lo:hi].any(0).int()
    assert torch.equal(flags, want)
    assert int(flags.sum()) > 0, "the leak must be flagged"
    assert torch.equal(out[sum(lens_q):], torch.zeros_like(out[sum(lens_q):])), "padding rows"


@pytest.mark.cuda
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("h, hkv, pack", PACKS)
@pytest.mark.parametrize("page", [16, 64])
def test_packed_over_a_paged_cache(entry, h, hkv, pack, page):
    """Decode and speculative rows over a paged cache (blocks in random order, garbage table
    entries), 40 sequences; guarded entries with NaN in the unused rows of each last page."""
    _gpu_only()
    torch.manual_seed(3)
    dev, d, dtype = "cuda", 128, torch.bfloat16
    lens_q, lens_k = _few(pack, seed=4)
    lens_q, lens_k = lens_q * 2, [n + 1000 for n in lens_k] * 2
    paged = random_paged(lens_k, hkv, d, page, dtype, dev)
    if entry != "prefill":
        _poison_unused_rows_of_last_pages(paged, lens_k, page, keys=False)
    q = torch.randn(sum(lens_q) + 3, h, d, device=dev).to(dtype)
    cq, ck = cu_seqlens(lens_q, dev), cu_seqlens(lens_k, dev)
    args = (q, paged.k_cache, paged.v_cache, cq, ck, max(lens_q), max(lens_k), d ** -0.5,
            True, paged.block_table)
    expected = reference.prefill(*args)
    if entry == "bound":
        run = hp.bind_prefill_guarded(*args, pack=pack)
        run(*args)
        got = run(*args)
    else:
        got = getattr(hp, entry)(*args, out=torch.full_like(q, float("nan")), pack=pack)
    assert_close(got, expected, *TOLERANCES[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("graph", [False, True])
def test_the_fixup_reads_the_flags_of_its_own_call(graph):
    """The bound entry's eager calls keep their flags per stream (no memset) and its captured
    calls take fresh ones: a leaking call right after a clean one on the same stream and
    signature must still be rewritten (the clean call left every kept flag 0), eager and
    replayed. NaN value rows: key 200 of sequence 0 (hidden from its rows 0..199), sequence 1's
    first 20 (read past sequence 0's last tile)."""
    _gpu_only()
    torch.manual_seed(0)
    lens, h, hkv, d = [250, 130], 8, 2, 128
    tq = sum(lens)
    cu = cu_seqlens(lens, "cuda")
    q = torch.randn(tq, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(tq, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = (torch.rand(tq, hkv, d, device="cuda") + 0.5).to(torch.bfloat16)
    dirty = v.clone()
    dirty[200] = float("nan")
    dirty[250:270] = float("nan")
    args = (cu, cu, max(lens), max(lens), d ** -0.5, True)
    expected = reference.prefill(q, k, dirty, *args)
    run = hp.bind_prefill_guarded(q, k, v, *args)
    values = v.clone()
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run(q, k, values, *args)  # compiles and pins both launches
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            clean = run(q, k, v, *args)
            out = run(q, k, values, *args)
        values.copy_(dirty)
        g.replay()
    else:
        run(q, k, v, *args)  # compiles, pins, leaves clean flags in the kept scratch
        clean = run(q, k, v, *args)
        out = run(q, k, dirty, *args)
    torch.cuda.synchronize()
    assert torch.isfinite(clean).all()
    seen = ~torch.isfinite(expected)
    assert seen.any() and not seen.all()
    assert torch.equal(torch.isnan(out), seen), "rows that do not see the NaN value were reached"
    assert_close(out[~seen], expected[~seen], *TOLERANCES[torch.bfloat16])


# --- sinks and the lse: the rows' finish (hopper_prefill_softmax.finish_rows) ------------------

EXTRAS = [pytest.param(True, False, id="sinks"), pytest.param(False, True, id="lse"),
          pytest.param(True, True, id="sinks-lse")]


@pytest.mark.cuda
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sinks, lse", EXTRAS)
@pytest.mark.parametrize("n", CONSUMERS)
def test_sinks_and_lse(entry, causal, sinks, lse, n):
    """Odd lengths, an empty sequence, padding rows (zeros, lse -inf), and a sequence of 70
    queries over 40 keys: causal, its first 30 rows see no key (zeros, lse -inf: the sink
    dropped, so a merge never counts it twice)."""
    _gpu_only()
    torch.manual_seed(0)
    _run([13, 0, 300, 129, 70], [13, 0, 300, 129, 40], 32, 8, 128, causal, torch.bfloat16,
         extra_rows=5, entry=entry, n_consumers=n, sinks=sinks, lse=lse)


@pytest.mark.cuda
@pytest.mark.parametrize("entry", ENTRIES[1:])
@pytest.mark.parametrize("n", CONSUMERS)
def test_sinks_and_lse_where_nan_values_leak(entry, n):
    """The NaN test's leaks (a hidden key, the next sequence's first rows): the fixup rewrites
    the flagged rows' output and lse with the sinks; every row's lse is the reference's."""
    _gpu_only()
    _run([250, 130], [250, 130], 8, 2, 128, True, torch.bfloat16,
         nan_rows=[200] + list(range(250, 270)), entry=entry, n_consumers=n, sinks=True,
         lse=True)


@pytest.mark.cuda
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("h, hkv, pack", PACKS)
def test_packed_sinks_and_lse(entry, h, hkv, pack):
    """The packed form: a row's head is the item's first plus its row over the tokens per head,
    for its sink and its lse; items with nothing to compute write zeros and -inf."""
    _gpu_only()
    torch.manual_seed(0)
    lens_q, lens_k = _few(pack)
    _run(lens_q, lens_k, h, hkv, 128, True, torch.bfloat16, extra_rows=5, entry=entry,
         pack=pack, sinks=True, lse=True)


@pytest.mark.cuda
@pytest.mark.parametrize("entry", ENTRIES[1:])
@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("n_consumers", CONSUMERS)
def test_paged_prefix_with_sinks_and_lse(entry, page, n_consumers):
    """test_paged_prefix's batch (NaN in the unused rows of each last page) with sinks and the
    lse through the guarded entries."""
    _gpu_only()
    torch.manual_seed(0)
    dev, h, hkv, d, dtype = "cuda", 16, 4, 128, torch.bfloat16
    lens_q, lens_k = [13, 0, 300, 128], [213, 37, 817, 128]
    paged = random_paged(lens_k, hkv, d, page, dtype, dev)
    _poison_unused_rows_of_last_pages(paged, lens_k, page)
    q = torch.randn(sum(lens_q) + 5, h, d, device=dev).to(dtype)
    sinks = torch.randn(h, device=dev) * 2
    cq, ck = cu_seqlens(lens_q, dev), cu_seqlens(lens_k, dev)
    args = (q, paged.k_cache, paged.v_cache, cq, ck, max(lens_q), max(lens_k), d ** -0.5,
            True, paged.block_table)
    expected, expected_lse = reference.prefill(*args, sinks=sinks, return_lse=True)
    if entry == "bound":
        run = hp.bind_prefill_guarded(*args, n_consumers=n_consumers, sinks=sinks,
                                      return_lse=True)
        run(*args, sinks=sinks)
        got, lse = run(*args, sinks=sinks)
    else:
        got, lse = hp.prefill_guarded(*args, out=torch.full_like(q, float("nan")),
                                      n_consumers=n_consumers, sinks=sinks, return_lse=True,
                                      lse=torch.full(q.shape[:2], float("nan"), device=dev))
    assert_close(got, expected, *TOLERANCES[dtype])
    assert_close(lse, expected_lse, 2e-3, 1e-3, what="lse")
