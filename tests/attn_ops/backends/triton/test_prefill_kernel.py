"""The varlen prefill Triton kernel (prefill_kernel.py): the interpreter at tiny shapes (CI) and,
marked ``cuda``, compiled on a GPU; against the reference backend with NaN-poisoned outputs."""

from __future__ import annotations

import pytest
import torch

import attn_ops
from attn_ops.backends import reference
from tests.support.helpers import (TOLERANCES, assert_close, cu_seqlens, poisoned, prefill_f64,
                                   laid_apart, random_paged, record_launches)

triton = pytest.importorskip("triton")
from attn_ops.backends.triton import hopper_prefill_launch, prefill_kernel  # noqa: E402

HALF = (torch.float16, torch.bfloat16)
BF16, FP16 = torch.bfloat16, torch.float16
DEV = "cuda"


def _nan(shape, dtype):
    return poisoned(shape, dtype, DEV)



# ---------------------------------------------------------------------------------------------
# interpreter
# ---------------------------------------------------------------------------------------------

def _dense_batch(lens_q, lens_k, h, hkv, d, dtype, extra_rows=0):
    q = torch.randn(sum(lens_q) + extra_rows, h, d, dtype=dtype)
    k = torch.randn(sum(lens_k), hkv, d, dtype=dtype)
    v = torch.randn_like(k)
    return q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k)


def _check_prefill(q, k, v, cu_q, cu_k, max_q, max_k, causal, block_table=None, window_left=-1,
                   softcap=0.0):
    scale = q.shape[-1] ** -0.5
    out = poisoned(q.shape, q.dtype)
    prefill_kernel.prefill(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, block_table,
                           window_left, softcap, out=out)
    ref = reference.prefill(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, block_table,
                            window_left, softcap)
    assert_close(out, ref, *TOLERANCES[q.dtype], what="prefill")
    return out


@pytest.mark.parametrize("causal,window_left,softcap", [
    (True, -1, 0.0), (False, -1, 0.0), (True, 5, 0.0), (False, 6, 0.0), (True, -1, 4.0),
    (True, 3, 2.5)])
@pytest.mark.parametrize("dtype", HALF)
def test_prefill_dense(causal, window_left, softcap, dtype):
    # lq < lk (prefix), an empty sequence, odd lengths, rows past cu_seqlens_q[-1]
    lens_q, lens_k = [13, 0, 5, 20], [13, 0, 11, 37]
    q, k, v, cu_q, cu_k = _dense_batch(lens_q, lens_k, 4, 2, 32, dtype, extra_rows=3)
    out = _check_prefill(q, k, v, cu_q, cu_k, 20, 37, causal, None, window_left, softcap)
    assert torch.all(out[-3:] == 0)


@pytest.mark.parametrize("h,hkv,d", [(4, 1, 64), (2, 2, 40)])
def test_prefill_heads_and_padded_head_dim(h, hkv, d):
    lens = [7, 18]
    q, k, v, cu_q, cu_k = _dense_batch(lens, lens, h, hkv, d, torch.float16)
    _check_prefill(q, k, v, cu_q, cu_k, 18, 18, True)


def test_prefill_fp32_matches_float64_oracle():
    lens_q, lens_k = [9, 4], [9, 17]
    q, k, v, cu_q, cu_k = _dense_batch(lens_q, lens_k, 4, 2, 32, torch.float32)
    out = prefill_kernel.prefill(q, k, v, cu_q, cu_k, 9, 17, 0.2, True, None, 4, 3.0)
    ref = prefill_f64(q, k, v, lens_q, lens_k, 0.2, True, 4, 3.0)
    assert_close(out, ref, 1e-5, 1e-5, what="prefill fp32 vs float64")


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("causal,window_left", [(True, -1), (False, 9)])
def test_prefill_paged_prefix(block_size, causal, window_left):
    dtype = torch.bfloat16
    lens_q, lens_k = [5, 0, 13], [21, 0, 40]
    paged = random_paged(lens_k, 2, 32, block_size, dtype)
    q = torch.randn(sum(lens_q), 4, 32, dtype=dtype)
    _check_prefill(q, paged.k_cache, paged.v_cache, cu_seqlens(lens_q), cu_seqlens(lens_k), 13,
                   40, causal, paged.block_table, window_left)


def test_prefill_through_op_and_no_keys():
    lens = [3, 6]
    q, k, v, cu_q, cu_k = _dense_batch(lens, lens, 2, 1, 32, torch.float16)
    out = attn_ops.prefill(q, k, v, cu_q, cu_k, 6, 6, 0.3, backend="triton")
    ref = attn_ops.prefill(q, k, v, cu_q, cu_k, 6, 6, 0.3, backend="reference")
    assert_close(out, ref, *TOLERANCES[torch.float16])
    empty = cu_seqlens([0, 0])  # every sequence empty: output all zero
    out = attn_ops.prefill(q, k[:0], v[:0], empty, empty, 0, 0, 0.3, backend="triton")
    assert torch.equal(out, torch.zeros_like(q))


def _strided_copy(t):
    """The values of 1-D ``t`` as every other element of a twice-as-long tensor (stride 2)."""
    wide = torch.full((2 * t.shape[0],), 12345, dtype=t.dtype)
    wide[::2] = t
    return wide[::2]


@pytest.mark.parametrize("paged", [False, True])
def test_prefill_strided_index_tensors(paged):
    # Issue 12: strided cu_seqlens / block tables were read as dense.
    dtype = torch.float16
    lens_q, lens_k = [5, 0, 13], [21, 0, 13]
    q = torch.randn(sum(lens_q), 4, 32, dtype=dtype)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    if paged:
        pb = random_paged(lens_k, 2, 32, 16, dtype)
        k, v, table = pb.k_cache, pb.v_cache, pb.block_table
        wide = torch.full((table.shape[0], 2 * table.shape[1]), -7, dtype=table.dtype)
        wide[:, 1::2] = table
        strided_table = wide[:, 1::2]
    else:
        k = torch.randn(sum(lens_k), 2, 32, dtype=dtype)
        v = torch.randn_like(k)
        table = strided_table = None
    ref = reference.prefill(q, k, v, cu_q, cu_k, 13, 21, 0.25, True, table)
    out = poisoned(q.shape, dtype)
    prefill_kernel.prefill(q, k, v, _strided_copy(cu_q), _strided_copy(cu_k), 13, 21, 0.25, True,
                           strided_table, out=out)
    assert_close(out, ref, *TOLERANCES[dtype], what="prefill, strided indices")
    got = attn_ops.prefill(q, k, v, _strided_copy(cu_q), _strided_copy(cu_k), 13, 21, 0.25, True,
                           strided_table, backend="triton")
    assert_close(got, ref, *TOLERANCES[dtype], what="prefill op, strided indices")


def test_prefill_paged_strided_cache():
    # Paged prefill over a cache whose block and in-page strides are not page * row and row.
    dtype = torch.bfloat16
    lens_q, lens_k = [3, 11], [19, 11]
    pb = random_paged(lens_k, 2, 32, 8, dtype)
    k_cache = pb.k_cache.transpose(1, 2).contiguous().transpose(1, 2)  # [blocks, page, Hkv, D]
    v_cache = pb.v_cache.transpose(1, 2).contiguous().transpose(1, 2)
    assert not k_cache.is_contiguous() and torch.equal(k_cache, pb.k_cache)
    q = torch.randn(sum(lens_q), 4, 32, dtype=dtype)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    out = poisoned(q.shape, dtype)
    prefill_kernel.prefill(q, k_cache, v_cache, cu_q, cu_k, 11, 19, 0.2, True, pb.block_table,
                           out=out)
    ref = reference.prefill(q, pb.k_cache, pb.v_cache, cu_q, cu_k, 11, 19, 0.2, True,
                            pb.block_table)
    assert_close(out, ref, *TOLERANCES[dtype], what="prefill, strided cache")


@pytest.mark.parametrize("window_left", [-1, 5])
def test_prefill_paged_kv_strides_apart(monkeypatch, window_left):
    # Paged K and V sharing block and in-page strides are read at one offset per key
    # (KV_SAME_STRIDES), a V laid out otherwise (helpers.laid_apart) at its
    # own; with a window, the masked loops too.
    dtype = torch.bfloat16
    lens_q, lens_k = [3, 11, 20], [19, 11, 40]
    pb = random_paged(lens_k, 2, 32, 8, dtype)
    v_apart = laid_apart(pb.v_cache)
    q = torch.randn(sum(lens_q), 4, 32, dtype=dtype)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    ref = reference.prefill(q, pb.k_cache, pb.v_cache, cu_q, cu_k, 20, 40, 0.2, True,
                            pb.block_table, window_left)
    same = record_launches(monkeypatch, prefill_kernel, "KV_SAME_STRIDES")
    for v, expected in ((v_apart, False), (pb.v_cache, True)):
        out = poisoned(q.shape, dtype)
        prefill_kernel.prefill(q, pb.k_cache, v, cu_q, cu_k, 20, 40, 0.2, True, pb.block_table,
                               window_left, out=out)
        assert_close(out, ref, *TOLERANCES[dtype], what=f"prefill, V strides {v.stride()}")
        assert same[-1] is expected, same


def _hidden_value_case(lens_q, lens_k, planted, causal, window_left, paged, dev="cpu"):
    """NaN and Inf value rows at ``planted`` key positions of sequence 0, each loaded by a masked
    step of some tile whose rows must not all see it (past the tile's causal end inside its last
    loaded key tile, or below a window inside its leading tile): rows that do not see one match
    the reference, rows that see one are non-finite. The kernel checks those keys before its
    masked loops and isolates only then, so this fails if a checked range misses a loaded key."""
    dtype, h, hkv, d = torch.bfloat16, 4, 2, 32
    q = torch.randn(sum(lens_q), h, d, dtype=dtype, device=dev)
    if paged:
        pb = random_paged(lens_k, hkv, d, 16, dtype, device=dev)
        k, v, table = pb.k_cache, pb.v_cache, pb.block_table
        slots = [int(table[0, p // 16]) * 16 + p % 16 for p in planted]
        flat = v.view(-1, hkv, d)
    else:
        k = torch.randn(sum(lens_k), hkv, d, dtype=dtype, device=dev)
        v, table, slots = torch.randn_like(k), None, list(planted)
        flat = v
    for slot, value in zip(slots, (float("nan"), float("inf"))):
        flat[slot, 1] = value  # kv head 1 only: heads 0-1 stay clean everywhere
    args = (q, k, v, cu_seqlens(lens_q, dev), cu_seqlens(lens_k, dev), max(lens_q), max(lens_k),
            0.2, causal, table, window_left)
    # Poisoned with a finite sentinel, not NaN: an unwritten row must not pass as a row that
    # saw the NaN (the finite rows' check catches it either way)
    out = prefill_kernel.prefill(*args, out=torch.full(q.shape, 1e4, dtype=dtype, device=dev))
    ref = reference.prefill(*args)
    finite = torch.isfinite(ref).all(-1)
    assert finite[:, :2].all() and not finite.all() and finite[:, 2:].any()  # the setup
    assert_close(out[finite], ref[finite], *TOLERANCES[dtype], what="rows that see no NaN/Inf")
    assert (~torch.isfinite(out[~finite])).any(-1).all(), "a row that sees NaN/Inf is finite"


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("causal,window_left,planted", [
    (True, -1, (25, 27)),  # lk - lq = 5: the 16-row tile at 0 loads keys 21..31 past its end
    (True, 4, (16, 35)),  # the tile at 16: key 16 below its window, 35 past its end
    (False, 4, (16, 30))])  # the tile at 16's leading keys 16..31: hidden from some rows
def test_hidden_non_finite_value_past_the_tile_or_below_the_window(paged, causal, window_left,
                                                                   planted):
    _hidden_value_case([40, 6], [45, 6], planted, causal, window_left, paged)


@pytest.mark.parametrize("kernel", ["prefill_kernel", "unified", "unified-2-splits"])
@pytest.mark.parametrize("causal,window_left", [(True, -1), (True, 9), (False, -1)])
def test_the_lse_of_a_row_that_sees_a_non_finite_value_is_the_references(causal, window_left,
                                                                          kernel):
    """A NaN value at key 5 and an infinite one at 50 of a 70-token sequence (seen on the
    diagonal's masked steps and, by later rows, on unmasked ones), sinks on: where keys are
    hidden (causal, window) the reference gives a NaN lse to every row that sees one
    (reference.poison_rows) and so do the FA2-style and unified kernels, split or not
    (softmax.lse_of_output); without hidden keys all give the scores' lse. Rows that see none:
    the reference's values."""
    from attn_ops.backends.triton import unified_kernel
    torch.manual_seed(0)
    lens = [70, 40]
    q, k = torch.randn(110, 4, 32), torch.randn(110, 2, 32)
    v = torch.rand(110, 2, 32) + 0.5
    v[5], v[50] = float("nan"), float("inf")
    cu = cu_seqlens(lens)
    args = (q, k, v, cu, cu, 70, 70, 32 ** -0.5, causal, None, window_left, 0.0,
            torch.randn(4) * 2)
    if kernel == "prefill_kernel":
        out, lse = prefill_kernel.prefill(*args, return_lse=True)
    else:
        splits = 2 if kernel.endswith("splits") else None
        out, lse = unified_kernel.prefill(*args, return_lse=True, splits=splits)
    ref, ref_lse = reference.prefill(*args, return_lse=True)
    nan = torch.isnan(ref_lse)
    assert nan.any() == (causal or window_left >= 0)  # the setup
    assert torch.equal(torch.isnan(lse), nan), "NaN lse rows differ from the reference's"
    assert_close(lse[~nan], ref_lse[~nan], 1e-4, 1e-4, what="lse")
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))


@pytest.mark.xfail(strict=True, reason="the few-query balanced kernel (decode_balanced_kernel."
                   "py) keeps the scores' lse for a row that sees a non-finite value: left "
                   "with the decode kernels it shares, whose change grew a key loop "
                   "(test_decode_kernel.py)")
def test_the_few_query_lse_of_a_row_that_sees_a_non_finite_value_is_the_references():
    """The few-query balanced kernel (unified_kernel's paged few-query plan) under the same
    rule: 4 and 3 queries over 70 and 40 cached keys, NaN value rows at keys 5 and 66 of the
    first; causal, every query sees key 66."""
    from attn_ops.backends.triton import unified_kernel
    torch.manual_seed(0)
    paged = random_paged([70, 40], 2, 32, 16, torch.float32)
    for pos in (5, 66):
        paged.v_cache[int(paged.block_table[0, pos // 16]), pos % 16] = float("nan")
    q = torch.randn(7, 4, 32)
    args = (q, paged.k_cache, paged.v_cache, cu_seqlens([4, 3]), cu_seqlens([70, 40]), 4, 70,
            32 ** -0.5, True, paged.block_table, -1, 0.0, torch.randn(4) * 2)
    out, lse = unified_kernel.prefill(*args, return_lse=True, balanced=True)
    ref, ref_lse = reference.prefill(*args, return_lse=True)
    nan = torch.isnan(ref_lse)
    assert nan.any() and not nan.all()  # the setup
    assert torch.equal(torch.isnan(lse), nan), "NaN lse rows differ from the reference's"
    assert_close(lse[~nan], ref_lse[~nan], 1e-4, 1e-4, what="lse")


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------

def _prefill_case(lens_q, lens_k, h, hkv, d, dtype, causal, window_left=-1, softcap=0.0,
                  block_size=None, extra_rows=0):
    q = torch.randn(sum(lens_q) + extra_rows, h, d, dtype=dtype, device=DEV)
    if block_size is None:
        k = torch.randn(sum(lens_k), hkv, d, dtype=dtype, device=DEV)
        v, table = torch.randn_like(k), None
    else:
        paged = random_paged(lens_k, hkv, d, block_size, dtype, device=DEV)
        k, v, table = paged.k_cache, paged.v_cache, paged.block_table
    cu_q, cu_k = cu_seqlens(lens_q, DEV), cu_seqlens(lens_k, DEV)
    args = (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), d ** -0.5, causal, table,
            window_left, softcap)
    out = prefill_kernel.prefill(*args, out=_nan(q.shape, dtype))
    ref = reference.prefill(*args)
    assert_close(out, ref, *TOLERANCES[dtype], what="prefill")
    if extra_rows:
        assert torch.all(out[-extra_rows:] == 0)


@pytest.mark.cuda
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("causal,window_left,planted", [
    (True, -1, (200, 230)),  # lk - lq = 33: the 128-row tile at 0 loads keys 161..255 unseen
    (True, 50, (20, 300)),  # the tile at 128: key 20 below its window, 300 past its end
    (False, 50, (20, 200))])  # below the windows of the tiles at 128 and 256
def test_hidden_non_finite_value_past_the_tile_or_below_the_window_cuda(paged, causal,
                                                                        window_left, planted):
    _hidden_value_case([300, 77], [333, 77], planted, causal, window_left, paged, dev=DEV)


@pytest.mark.cuda
@pytest.mark.parametrize("d", [64, 96, 128, 256, 40])
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_head_dims_cuda(d, dtype, causal):
    _prefill_case([300, 1, 0, 129], [300, 1, 0, 257], 8, 2, d, dtype, causal, extra_rows=5)


@pytest.mark.cuda
@pytest.mark.parametrize("h,hkv", [(32, 8), (16, 1), (6, 6), (12, 3)])
@pytest.mark.parametrize("window_left,softcap", [(-1, 0.0), (100, 0.0), (-1, 30.0), (0, 0.0)])
def test_prefill_gqa_window_softcap_cuda(h, hkv, window_left, softcap):
    _prefill_case([513, 77, 13], [513, 200, 13], h, hkv, 128, BF16, True, window_left, softcap)


@pytest.mark.cuda
@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_paged_prefix_cuda(block_size, causal):
    _prefill_case([200, 0, 31, 1], [700, 0, 31, 1000], 8, 2, 128, BF16, causal,
                  block_size=block_size)


@pytest.mark.cuda
def test_prefill_fp32_and_window_noncausal_cuda():
    _prefill_case([64, 100], [64, 300], 4, 2, 64, torch.float32, False, window_left=50)
    _prefill_case([333], [333], 4, 4, 128, FP16, False, window_left=17, softcap=5.0)



# --- fixup mode: rewrite only the row blocks another kernel flagged (the Hopper route) -------

def _flagged_rows(flags, lens, rows):
    """{(seq, head): set of rows} that flags ``[tiles, B + 1, H, F]`` (F / 2 flags per half
    tile of ``rows`` rows) name: the whole half tile holding a flagged row."""
    want = {}
    for g, seq, head, flag in flags.nonzero().tolist():
        if seq >= len(lens):
            continue  # the rows-past-the-end column: never rewritten
        lq, half = lens[seq], flag // (flags.shape[3] // 2)
        m0 = (-(-lq // (2 * rows)) - 1 - g) * 2 * rows + half * rows
        want.setdefault((seq, head), set()).update(r for r in range(m0, m0 + rows)
                                                   if 0 <= r < lq)
    return want


@pytest.mark.parametrize("per_half", [1, 2])
@pytest.mark.parametrize("pattern", ["none", "some", "all"])
def test_fixup_rewrites_exactly_the_flagged_rows(pattern, per_half):
    """Poisoned output, a flag pattern over a varlen batch (odd lengths, an empty sequence, GQA,
    padding rows past the end): flagged half tiles equal the reference, every other element is
    still poison (the launch wrote nothing else). Flags per half tile: one (the Gluon kernel's
    two-consumer form) or two (one consumer: a flag per warp)."""
    torch.manual_seed(3)
    lens, rows, h, hkv, d = [13, 0, 45, 75], 32, 4, 2, 32
    tiles = -(-max(lens) // (2 * rows))
    q = torch.randn(sum(lens) + 3, h, d, dtype=torch.bfloat16)
    k = torch.randn(sum(lens), hkv, d, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = cu_seqlens(lens)
    flags = torch.zeros(tiles, len(lens) + 1, h, 4, dtype=torch.int32)  # 16 rows per flag
    if pattern == "some":
        flags[0, 2, 1, 3] = 1  # seq 2 (one tile), head 1, rows 48..63: half 1, rows 32..44
        flags[0, 2, 3, 1] = 1  # seq 2, head 3, rows 16..31: half 0, rows 0..31
        flags[0, 3, 0, 1] = 1  # seq 3's last tile (rows 64..127), head 0: rows 64..74
        flags[0, 3, 2, 3] = 1  # seq 3's last tile, head 2, rows 112..127: no row (lq 75)
        flags[1, 3, 1, 2] = 1  # seq 3's first tile, head 1, rows 32..47: rows 32..63
        flags[1, 0, 2, 0] = 1  # seq 0 has one tile: tile 1 does not exist
        flags[0, 1, 0, 0] = 1  # the empty sequence
        flags[0, 4, 0, 0] = 1  # the padding column
    elif pattern == "all":
        flags.fill_(1)
    if per_half == 1:  # a flag per half: any of its two
        flags = flags.view(*flags.shape[:3], 2, 2).amax(-1).contiguous()
    out = poisoned(q.shape, torch.bfloat16, "cpu")
    hopper_prefill_launch.fixup(q, k, v, cu, cu, max(lens), 0.3, True, out, flags, rows)
    ref = reference.prefill(q, k, v, cu, cu, max(lens), max(lens), 0.3, True)
    want = _flagged_rows(flags, lens, rows)
    written = torch.zeros(q.shape[:2], dtype=torch.bool)
    for (seq, head), rs in want.items():
        for r in rs:
            written[sum(lens[:seq]) + r, head] = True
    assert_close(out[written], ref[written], *TOLERANCES[torch.bfloat16], what="fixed rows")
    assert torch.isnan(out[~written]).all(), "the fixup wrote rows nobody flagged"
    if pattern == "some":
        assert int(written.sum()) == 13 + 32 + 11 + 32  # the rows the comments above name
