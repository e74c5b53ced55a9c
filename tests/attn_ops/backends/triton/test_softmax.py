"""Sinks, the lse and FP8 caches (softmax.py, shared by every Triton attention kernel): the dense
and paged prefill kernel, the unified kernel (prefill and decode, forced splits) and the split-KV
decode (fused and launched merges), through the interpreter at tiny shapes (CI) and, marked
``cuda``, compiled on a GPU. Against the reference backend (which reads FP8 as ``x * scale``) and
the float64 oracle, with NaN-poisoned outputs and lse."""

from __future__ import annotations

import math

import pytest
import torch

import attn_ops
from attn_ops.backends import reference
from tests.support.helpers import (TOLERANCES, assert_close, cu_seqlens, prefill_f64,
                                   random_paged)

triton = pytest.importorskip("triton")
from attn_ops.backends.triton import (decode_kernel, prefill_kernel,  # noqa: E402
                                      unified_kernel, unified_plan)

BF16, FP16 = torch.bfloat16, torch.float16
FP8 = torch.float8_e4m3fn
LSE_TOL = (2e-4, 2e-4)  # fp32 log-sum-exp of the same scores: far tighter than the outputs


def _device(cuda: bool) -> str:
    return "cuda" if cuda else "cpu"


def _nan(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _scales(kind: str, hkv: int, device):
    """(k_scale, v_scale): per head ``[Hkv]`` or scalar ``[]`` float32, never 1 (a missed
    scale must show)."""
    if kind == "head":
        return (torch.rand(hkv, device=device) * 0.5 + 0.3,
                torch.rand(hkv, device=device) * 0.5 + 0.6)
    return torch.tensor(0.45, device=device), torch.tensor(0.8, device=device)


def _quantize(k, v, k_scale, v_scale):
    """FP8 copies of k/v (``[..., Hkv, D]``) as store_kvcache writes them."""
    return (reference.quantize_fp8(k, k_scale, FP8), reference.quantize_fp8(v, v_scale, FP8))


def _check_lse(lse, ref, what):
    assert not lse.isnan().any(), f"{what}: NaN in the lse"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), f"{what}: -inf rows differ"
    finite = torch.isfinite(ref)
    assert_close(lse[finite], ref[finite], *LSE_TOL, what=f"{what} lse")


def _check(got_out, got_lse, args, kwargs, dtype, what, decode=False):
    """Compare with the reference; rows with no key are zero with lse -inf."""
    fn = reference.decode if decode else reference.prefill
    ref_out, ref_lse = fn(*args, **kwargs, return_lse=True)
    assert_close(got_out, ref_out, *TOLERANCES[dtype], what=what)
    _check_lse(got_lse, ref_lse, what)
    empty = torch.isneginf(ref_lse)
    assert torch.all(got_out[empty] == 0), f"{what}: a row with no key is not zero"


# ---------------------------------------------------------------------------------------------
# the cases, shared by the interpreter and the cuda tests
# ---------------------------------------------------------------------------------------------

def prefill_case(kernel, lens_q, lens_k, h, hkv, d, dtype, *, causal=True, window_left=-1,
                 softcap=0.0, paged=False, sinks=True, fp8=None, splits=None, extra_rows=0,
                 block_size=16, cuda=False):
    dev = _device(cuda)
    q = torch.randn(sum(lens_q) + extra_rows, h, d, dtype=dtype, device=dev)
    if paged:
        pb = random_paged(lens_k, hkv, d, block_size, dtype, device=dev)
        k, v, table = pb.k_cache, pb.v_cache, pb.block_table
    else:
        k = torch.randn(sum(lens_k), hkv, d, dtype=dtype, device=dev)
        v = torch.randn_like(k)
        table = None
    k_scale = v_scale = None
    if fp8:
        k_scale, v_scale = _scales(fp8, hkv, dev)
        k, v = _quantize(k, v, k_scale, v_scale)
    s = torch.randn(h, device=dev) * 2 if sinks else None
    args = (q, k, v, cu_seqlens(lens_q, dev), cu_seqlens(lens_k, dev), max(lens_q),
            max(lens_k), d ** -0.5, causal, table, window_left, softcap)
    kwargs = dict(sinks=s, k_scale=k_scale, v_scale=v_scale)
    extra = dict(splits=splits) if kernel is unified_kernel else {}
    out, lse = _nan(q.shape, dtype, dev), _nan(q.shape[:2], torch.float32, dev)
    kernel.prefill(*args, **kwargs, return_lse=True, out=out, lse=lse, **extra)
    _check(out, lse, args, kwargs, dtype, f"{kernel.__name__} prefill")
    # the plain op (no lse) gives the same output
    plain = kernel.prefill(*args, **kwargs, **extra)
    assert_close(plain, out, 0.0, 0.0, what="prefill without lse")
    return out, lse


def decode_case(kernel, lens, h, hkv, d, dtype, *, window_left=-1, softcap=0.0, sinks=True,
                fp8=None, splits=None, fused=None, block_size=16, cuda=False):
    dev = _device(cuda)
    pb = random_paged(lens, hkv, d, block_size, dtype, device=dev)
    k, v = pb.k_cache, pb.v_cache
    k_scale = v_scale = None
    if fp8:
        k_scale, v_scale = _scales(fp8, hkv, dev)
        k, v = _quantize(k, v, k_scale, v_scale)
    q = torch.randn(len(lens), h, d, dtype=dtype, device=dev)
    s = torch.randn(h, device=dev) * 2 if sinks else None
    args = (q, k, v, torch.tensor(lens, dtype=torch.int32, device=dev), pb.block_table,
            d ** -0.5, window_left, softcap)
    kwargs = dict(sinks=s, k_scale=k_scale, v_scale=v_scale)
    extra = dict(splits=splits)
    if kernel is decode_kernel:
        extra["fused"] = fused
    out, lse = _nan(q.shape, dtype, dev), _nan(q.shape[:2], torch.float32, dev)
    kernel.decode(*args, **kwargs, return_lse=True, out=out, lse=lse, **extra)
    _check(out, lse, args, kwargs, dtype, f"{kernel.__name__} decode", decode=True)
    return out, lse


PREFILL_KERNELS = [prefill_kernel, unified_kernel]
DECODE_KERNELS = [decode_kernel, unified_kernel]
_ids = lambda m: m.__name__.rsplit(".", 1)[-1]  # noqa: E731


# ---------------------------------------------------------------------------------------------
# interpreter
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", PREFILL_KERNELS, ids=_ids)
@pytest.mark.parametrize("causal,window_left,softcap,paged", [
    (True, -1, 0.0, False), (True, 4, 2.5, True), (False, 5, 0.0, False)])
def test_prefill_sinks_lse(kernel, causal, window_left, softcap, paged):
    # odd lengths, an empty sequence, more queries than keys (early causal rows see nothing:
    # lse -inf, zeros, the sink dropped), GQA, rows past cu_seqlens_q[-1]
    out, lse = prefill_case(kernel, [13, 0, 5, 3], [13, 0, 19, 2], 4, 2, 32, BF16,
                            causal=causal, window_left=window_left, softcap=softcap,
                            paged=paged, extra_rows=3)
    assert torch.all(out[-3:] == 0) and torch.all(torch.isneginf(lse[-3:]))


@pytest.mark.parametrize("splits", [2, 5])
def test_unified_prefill_splits_add_the_sink_once(splits):
    # the sink joins at the merge (fused up to 8 splits); a window leaves some splits empty
    # for some rows, which a sink added in split 0 would get wrong
    prefill_case(unified_kernel, [3, 1, 4], [37, 20, 4], 4, 2, 32, FP16, window_left=6,
                 paged=True, splits=splits)


def test_unified_prefill_launched_merge():
    cfg = unified_plan.Config(16, 16, 16, 4, 1, True, False)  # fused=False: second launch
    dev_args = dict(causal=True, paged=True, splits=3)
    q_lens, k_lens = [3, 0, 2], [30, 0, 17]
    dev = "cpu"
    pb = random_paged(k_lens, 2, 32, 16, BF16)
    q = torch.randn(sum(q_lens) + 2, 4, 32, dtype=BF16)
    s = torch.randn(4)
    args = (q, pb.k_cache, pb.v_cache, cu_seqlens(q_lens), cu_seqlens(k_lens), 3, 30, 0.2,
            dev_args["causal"], pb.block_table)
    out, lse = _nan(q.shape, BF16, dev), _nan(q.shape[:2], torch.float32, dev)
    unified_kernel.prefill(*args, sinks=s, return_lse=True, config=cfg, splits=3, out=out,
                           lse=lse)
    _check(out, lse, args, dict(sinks=s), BF16, "unified, launched merge")


@pytest.mark.parametrize("kernel", PREFILL_KERNELS, ids=_ids)
@pytest.mark.parametrize("fp8,paged", [("head", True), ("scalar", False)])
def test_prefill_fp8(kernel, fp8, paged):
    prefill_case(kernel, [13, 4], [13, 21], 4, 2, 32, BF16, fp8=fp8, paged=paged,
                 sinks=fp8 == "head")


# The split decode kernel with its merge fused and launched; the unified kernel's launched merge
# is tested on prefill (above), and decode_case passes it no ``fused``.
@pytest.mark.parametrize("kernel,splits,fused", [
    *[(kernel, splits, fused) for kernel in DECODE_KERNELS
      for splits, fused in ((1, None), (3, True), (9, None))],
    (decode_kernel, 3, False)], ids=lambda x: _ids(x) if hasattr(x, "__name__") else str(x))
def test_decode_sinks_lse_splits(kernel, splits, fused):
    # seqlens 0 (padded row: zeros, lse -inf, sink dropped), 1, odd; 9 splits leave some empty
    out, lse = decode_case(kernel, [13, 0, 40, 1], 4, 2, 32, BF16, splits=splits, fused=fused)
    assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))


@pytest.mark.parametrize("kernel", DECODE_KERNELS, ids=_ids)
@pytest.mark.parametrize("window_left,softcap,fp8", [(5, 0.0, "head"), (-1, 3.0, "scalar")])
def test_decode_fp8_window_softcap(kernel, window_left, softcap, fp8):
    decode_case(kernel, [23, 0, 7], 4, 1, 32, FP16, window_left=window_left, softcap=softcap,
                fp8=fp8, splits=2)


def test_decode_fp8_without_sinks_or_lse_matches_the_reference():
    lens = [29, 3]
    pb = random_paged(lens, 2, 32, 16, BF16)
    k_scale, v_scale = _scales("head", 2, "cpu")
    k, v = _quantize(pb.k_cache, pb.v_cache, k_scale, v_scale)
    q = torch.randn(2, 4, 32, dtype=BF16)
    args = (q, k, v, torch.tensor(lens, dtype=torch.int32), pb.block_table, 0.2)
    got = decode_kernel.decode(*args, k_scale=k_scale, v_scale=v_scale, out=_nan(q.shape, BF16,
                                                                                  "cpu"))
    ref = reference.decode(*args, k_scale=k_scale, v_scale=v_scale)
    assert_close(got, ref, *TOLERANCES[BF16], what="fp8 decode")
    with pytest.raises(ValueError, match="k_scale"):
        decode_kernel.decode(*args)


def fp8_extreme_q_case(cuda=False, softcap=0.0):
    """bf16 q rows far outside fp16's range (3e5) and far below it (1e-6), and a row of zeros,
    over an FP8 cache: the decode kernel widens FP8 to fp16 and rescales each q row into fp16's
    range by a power of two, which must give the reference's result for every row."""
    dev = _device(cuda)
    lens, h, hkv, d = ([3000, 77, 1], 32, 8, 128) if cuda else ([29, 5, 1], 4, 2, 32)
    pb = random_paged(lens, hkv, d, 16, BF16, device=dev)
    k_scale, v_scale = _scales("head", hkv, dev)
    k, v = _quantize(pb.k_cache, pb.v_cache, k_scale, v_scale)
    q = torch.randn(len(lens), h, d, device=dev)
    q[0] *= 3e5
    q[1] *= 1e-6
    q[2, : h // 2] = 0.0
    q = q.to(BF16)
    args = (q, k, v, torch.tensor(lens, dtype=torch.int32, device=dev), pb.block_table,
            d ** -0.5 * (1e-5 if softcap == 0 else 1.0), -1, softcap)
    got = decode_kernel.decode(*args, k_scale=k_scale, v_scale=v_scale,
                               out=_nan(q.shape, BF16, dev))
    ref = reference.decode(*args, k_scale=k_scale, v_scale=v_scale)
    assert_close(got, ref, *TOLERANCES[BF16], what="fp8 decode, extreme q magnitudes")


@pytest.mark.parametrize("softcap", [0.0, 20.0])
def test_decode_fp8_extreme_q_magnitudes(softcap):
    fp8_extreme_q_case(softcap=softcap)


def test_prefill_with_lse_through_the_op_against_float64():
    # the independent oracle: a float64 loop with sinks and the lse
    lens_q, lens_k, h, hkv, d = [5, 13, 0], [9, 13, 0], 4, 2, 32
    q = torch.randn(sum(lens_q), h, d)
    k, v = torch.randn(sum(lens_k), hkv, d), torch.randn(sum(lens_k), hkv, d)
    sinks = torch.randn(h)
    args = (q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), 13, 13, 0.3, True, None, 3, 0.0)
    out, lse = attn_ops.prefill_with_lse(*args, sinks=sinks, backend="triton")
    exp_out, exp_lse = prefill_f64(q, k, v, lens_q, lens_k, 0.3, True, 3, 0.0, sinks,
                                   return_lse=True)
    assert_close(out, exp_out.float(), *TOLERANCES[torch.float32], what="out vs float64")
    _check_lse(lse, exp_lse.float(), "lse vs float64")


def test_decode_with_lse_through_the_op_fp8():
    lens = [17, 0, 5]
    pb = random_paged(lens, 2, 32, 16, BF16)
    k_scale, v_scale = _scales("scalar", 2, "cpu")
    k, v = _quantize(pb.k_cache, pb.v_cache, k_scale, v_scale)
    q = torch.randn(3, 4, 32, dtype=BF16)
    args = (q, k, v, torch.tensor(lens, dtype=torch.int32), pb.block_table, 0.2, -1, 0.0,
            torch.randn(4), k_scale, v_scale)
    out, lse = attn_ops.decode_with_lse(*args, backend="triton")
    ref_out, ref_lse = attn_ops.decode_with_lse(*args, backend="reference")
    assert_close(out, ref_out, *TOLERANCES[BF16], what="decode_with_lse")
    _check_lse(lse, ref_lse, "decode_with_lse")


def test_cascade_merge_equals_one_call():
    # prefix part (no sinks) + own part (sinks) merged == one call over all keys with sinks
    h, hkv, d, lq, lp = 4, 2, 32, 5, 11
    q = torch.randn(lq, h, d, dtype=FP16)
    k, v = torch.randn(lp + lq, hkv, d, dtype=FP16), torch.randn(lp + lq, hkv, d, dtype=FP16)
    sinks = torch.randn(h)
    cq = cu_seqlens([lq])
    o1, l1 = attn_ops.prefill_with_lse(q, k[:lp], v[:lp], cq, cu_seqlens([lp]), lq, lp, 0.2,
                                       False, backend="triton")
    o2, l2 = attn_ops.prefill_with_lse(q, k[lp:], v[lp:], cq, cq, lq, lq, 0.2, True,
                                       sinks=sinks, backend="triton")
    out, lse = attn_ops.merge_states(o1, l1, o2, l2, backend="triton")
    ref_out, ref_lse = attn_ops.prefill_with_lse(q, k, v, cq, cu_seqlens([lp + lq]), lq,
                                                 lp + lq, 0.2, True, sinks=sinks,
                                                 backend="reference")
    assert_close(out, ref_out, *TOLERANCES[FP16], what="merged cascade")
    _check_lse(lse, ref_lse, "merged cascade")
    assert math.isfinite(float(lse.min()))


def isolation_case(kernel, splits=None, cuda=False, lk=40, block_size=16):
    """A NaN and an Inf value row in the causal future of a sequence's first query (inside its
    last key tile): the first query's rows stay clean, every row that sees one is non-finite
    (the reference's rule), with sinks and the lse."""
    dev = _device(cuda)
    lens_q, lens_k, h, hkv, d = [3, 2], [lk, 9], 4, 2, 32
    pb = random_paged(lens_k, hkv, d, block_size, BF16, device=dev)
    flat = pb.v_cache.view(-1, hkv, d)
    for pos, value in ((lk - 2, math.nan), (lk - 1, math.inf)):  # query 0 sits at lk - 3
        flat[int(pb.block_table[0, pos // block_size]) * block_size + pos % block_size] = value
    q = torch.randn(sum(lens_q), h, d, dtype=BF16, device=dev)
    args = (q, pb.k_cache, pb.v_cache, cu_seqlens(lens_q, dev), cu_seqlens(lens_k, dev), 3, lk,
            0.2, True, pb.block_table)
    kwargs = dict(sinks=torch.randn(h, device=dev))
    extra = dict(splits=splits) if kernel is unified_kernel else {}
    out, lse = kernel.prefill(*args, **kwargs, return_lse=True, **extra)
    ref_out, ref_lse = reference.prefill(*args, **kwargs, return_lse=True)
    finite = torch.isfinite(ref_out).all(-1)
    assert finite[0].all() and finite[3:].all() and not finite[1:3].any()  # the setup
    assert_close(out[finite], ref_out[finite], *TOLERANCES[BF16], what="clean rows")
    _check_lse(lse[finite], ref_lse[finite], "clean rows")
    assert (~torch.isfinite(out[~finite])).any(-1).all(), "a row that sees NaN/Inf is finite"


@pytest.mark.parametrize("kernel,splits", [(prefill_kernel, None), (unified_kernel, 1),
                                           (unified_kernel, 2)])
def test_hidden_non_finite_value_stays_out(kernel, splits):
    # unified: 3 queries x G = 2 rows take the small path (masked steps, isolated only on the
    # diagonal ones); the prefill kernel: its masked diagonal loop
    isolation_case(kernel, splits)


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("kernel,splits", [(prefill_kernel, None), (unified_kernel, None),
                                           (unified_kernel, 3)])
@pytest.mark.parametrize("lk", [40, 1000])
def test_hidden_non_finite_value_stays_out_cuda(kernel, splits, lk):
    isolation_case(kernel, splits, cuda=True, lk=lk)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", PREFILL_KERNELS, ids=_ids)
@pytest.mark.parametrize("causal,window_left,softcap,paged", [
    (True, -1, 0.0, False), (True, 256, 30.0, True), (False, 100, 0.0, False),
    (True, -1, 0.0, True)])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_prefill_sinks_lse_cuda(kernel, causal, window_left, softcap, paged, dtype):
    prefill_case(kernel, [1000, 0, 123, 13, 700], [1000, 0, 517, 13, 300], 32, 8, 128, dtype,
                 causal=causal, window_left=window_left, softcap=softcap, paged=paged,
                 extra_rows=7, cuda=True)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", PREFILL_KERNELS, ids=_ids)
@pytest.mark.parametrize("fp8,paged,sinks", [("head", True, True), ("scalar", False, False),
                                             ("head", False, True)])
@pytest.mark.parametrize("d", [64, 128])
def test_prefill_fp8_cuda(kernel, fp8, paged, sinks, d):
    prefill_case(kernel, [777, 13, 0, 123], [1500, 13, 0, 123], 16, 4, d, BF16, fp8=fp8,
                 paged=paged, sinks=sinks, cuda=True)


@pytest.mark.cuda
@pytest.mark.parametrize("splits", [None, 3, 8, 16])
@pytest.mark.parametrize("window_left", [-1, 200])
def test_unified_prefill_splits_sinks_cuda(splits, window_left):
    prefill_case(unified_kernel, [4, 1, 0, 16], [3000, 200, 0, 16], 32, 8, 128, BF16,
                 window_left=window_left, paged=True, splits=splits, extra_rows=5, cuda=True)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel,splits,fused", [
    *[(kernel, splits, fused) for kernel in DECODE_KERNELS
      for splits, fused in ((None, None), (1, None), (7, True), (32, None))],
    (decode_kernel, 7, False)], ids=lambda x: _ids(x) if hasattr(x, "__name__") else str(x))
@pytest.mark.parametrize("fp8", [None, "head", "scalar"])
def test_decode_sinks_lse_fp8_cuda(kernel, splits, fused, fp8):
    # (the unified kernel's launched merge is tested on prefill; decode_case passes it no fused)
    out, lse = decode_case(kernel, [4096, 0, 1, 333, 2000], 32, 8, 128, BF16, splits=splits,
                           fused=fused, fp8=fp8, cuda=True)
    assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))


@pytest.mark.cuda
@pytest.mark.parametrize("window_left,softcap", [(300, 0.0), (-1, 50.0), (0, 0.0)])
@pytest.mark.parametrize("block_size", [16, 64, 256])
def test_decode_window_softcap_fp8_cuda(window_left, softcap, block_size):
    decode_case(decode_kernel, [2000, 5, 0, 900], 16, 4, 128, FP16, window_left=window_left,
                softcap=softcap, fp8="head", block_size=block_size, cuda=True)


@pytest.mark.cuda
@pytest.mark.parametrize("softcap", [0.0, 20.0])
def test_decode_fp8_extreme_q_magnitudes_cuda(softcap):
    fp8_extreme_q_case(cuda=True, softcap=softcap)


@pytest.mark.cuda
def test_decode_with_lse_op_and_fused_repeats_cuda():
    # the semaphores reset themselves with sinks and the lse too: many calls, each checked
    for _ in range(10):
        decode_case(decode_kernel, [3000, 1, 0, 777], 32, 8, 128, BF16, splits=7, fused=True,
                    fp8="head", cuda=True)
