"""FP8 (float8_e4m3fn) KV caches: the store's saturate-and-round, reads as x * scale against the
float64 loop, the scale rules (errors naming the argument), opcheck, compile."""

import pytest
import torch
from torch.library import opcheck

import attn_ops
from attn_ops.backends import reference
from tests.support.helpers import (assert_close, attention_f64, cu_seqlens, fp8_meaning,
                                   random_paged)

FP8 = torch.float8_e4m3fn


def _fp8_grid() -> torch.Tensor:
    """Every finite non-negative e4m3fn value (bytes 0x00..0x7E), ascending."""
    return torch.arange(0, 0x7F, dtype=torch.uint8).view(FP8).float()


def _fp8_paged(lens, hkv, d, bs, k_scale, v_scale):
    """A random paged batch stored as FP8, and what the cache means (float32 ``x * scale``)."""
    pb = random_paged(lens, hkv, d, bs, torch.float32)
    shape = pb.k_cache.shape
    k8 = reference.quantize_fp8(pb.k_cache.view(-1, hkv, d) * 3, k_scale, FP8).view(shape)
    v8 = reference.quantize_fp8(pb.v_cache.view(-1, hkv, d) * 3, v_scale, FP8).view(shape)
    k_dense = [fp8_meaning(reference.quantize_fp8(x * 3, k_scale, FP8), k_scale)
               for x in pb.k_dense]
    v_dense = [fp8_meaning(reference.quantize_fp8(x * 3, v_scale, FP8), v_scale)
               for x in pb.v_dense]
    return k8, v8, pb.block_table, k_dense, v_dense


@pytest.mark.parametrize("scale_shape", [(), (2,)])
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_store_writes_saturated_rounded_values(scale_shape, key_dtype):
    hkv, d, bs, nb = 2, 8, 4, 5
    k_cache = torch.zeros(nb, bs, hkv, d, dtype=FP8)
    v_cache = torch.zeros_like(k_cache)
    key = (torch.randn(6, hkv, d) * 300).to(key_dtype)  # many beyond 448 * scale: saturate
    value = torch.randn(6, hkv, d).to(key_dtype)
    key[0, 0, 0], key[2, 1, 1] = float("inf"), float("-inf")
    k_scale, v_scale = torch.rand(scale_shape) + 0.5, torch.rand(scale_shape) + 0.1
    slots = torch.tensor([3, -1, 7, 0, 19, 11])
    before = k_cache.view(torch.uint8).clone()
    attn_ops.store_kvcache(key, value, k_cache, v_cache, slots, k_scale, v_scale,
                           backend="reference")
    flat_k, flat_v = k_cache.view(-1, hkv, d).float(), v_cache.view(-1, hkv, d).float()
    ks, vs = k_scale.reshape(-1, 1), v_scale.reshape(-1, 1)
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        want_k = (key[t].float() / ks).clamp(-448, 448)
        assert flat_k[s].abs().max() <= 448
        # round to nearest: within half a grid step (1/16 relative for normals, 2^-10 below)
        assert ((flat_k[s] - want_k).abs() <= want_k.abs() / 16 + 2 ** -10).all()
        assert torch.equal(flat_v[s], (value[t].float() / vs).clamp(-448, 448).to(FP8).float())
    assert flat_k[3, 0, 0] == 448 and flat_k[7, 1, 1] == -448
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[[3, 7, 0, 19, 11]] = False
    assert torch.equal(k_cache.view(torch.uint8).view(-1, hkv, d)[untouched],
                       before.view(-1, hkv, d)[untouched])


def test_store_rounds_ties_to_even():
    """Midpoints between neighbouring e4m3fn values go to the one with an even mantissa."""
    grid = _fp8_grid()
    mids = (grid[:-1] + grid[1:]) / 2
    n = mids.numel()
    k_cache = torch.zeros(n, 1, 1, 8, dtype=FP8)
    v_cache = torch.zeros_like(k_cache)
    key = mids.reshape(n, 1, 1).expand(n, 1, 8).contiguous()
    attn_ops.store_kvcache(key, -key, k_cache, v_cache, torch.arange(n), torch.tensor(1.0),
                           torch.tensor(1.0), backend="reference")
    lower = torch.arange(n)
    want = torch.where(lower % 2 == 0, lower, lower + 1)  # the code's last bit is the mantissa's
    assert torch.equal(k_cache.view(torch.uint8)[:, 0, 0].to(torch.int64), want[:, None].expand(n, 8))
    assert torch.equal(v_cache.view(torch.uint8)[:, 0, 0].to(torch.int64),
                       (want | 0x80)[:, None].expand(n, 8))  # the sign bit on the same code


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lens,h,hkv,d,bs,window,with_sinks", [
    ([5, 0, 13], 4, 2, 16, 4, -1, True), ([1, 9], 2, 1, 32, 8, 3, False)])
def test_decode_reads_x_times_scale(q_dtype, lens, h, hkv, d, bs, window, with_sinks):
    k_scale, v_scale = torch.rand(hkv) + 0.5, torch.tensor(0.25)
    k8, v8, table, k_dense, v_dense = _fp8_paged(lens, hkv, d, bs, k_scale, v_scale)
    q = torch.randn(len(lens), h, d, dtype=q_dtype)
    sinks = torch.randn(h) if with_sinks else None
    out, lse = attn_ops.decode_with_lse(q, k8, v8, torch.tensor(lens, dtype=torch.int32), table,
                                        d ** -0.5, window, 0.0, sinks, k_scale, v_scale,
                                        backend="reference")
    assert out.dtype == q_dtype
    for b in range(len(lens)):
        want, want_lse = attention_f64(q[b:b + 1], k_dense[b], v_dense[b], d ** -0.5, True,
                                       window, 0.0, sinks, return_lse=True)
        assert_close(out[b], want[0], 1e-2, 1e-2)
        assert_close(lse[b], want_lse[0], 1e-5, 1e-5, "lse")


@pytest.mark.parametrize("paged", [False, True])
def test_prefill_reads_x_times_scale(paged):
    lens_q, lens_k, h, hkv, d = [3, 0, 6], [5, 2, 6], 4, 2, 16
    k_scale, v_scale = torch.tensor(0.5), torch.rand(hkv) + 0.5
    k8, v8, table, k_dense, v_dense = _fp8_paged(lens_k, hkv, d, 4, k_scale, v_scale)
    if not paged:
        k8 = reference.quantize_fp8(torch.cat(k_dense), k_scale, FP8)
        v8 = reference.quantize_fp8(torch.cat(v_dense), v_scale, FP8)
        table = None
    q = torch.randn(sum(lens_q), h, d, dtype=torch.bfloat16)
    out = attn_ops.prefill(q, k8, v8, cu_seqlens(lens_q), cu_seqlens(lens_k), 6, 6, 0.3, True,
                           table, -1, 0.0, None, k_scale, v_scale, backend="reference")
    start_q = start_k = 0
    for lq, lk in zip(lens_q, lens_k):
        want = attention_f64(q[start_q:start_q + lq], torch.cat(k_dense)[start_k:start_k + lk],
                             torch.cat(v_dense)[start_k:start_k + lk], 0.3, True)
        assert_close(out[start_q:start_q + lq], want, 1e-2, 1e-2)
        start_q, start_k = start_q + lq, start_k + lk


def _decode_args(**over):
    hkv = 2
    k8, v8, table, _, _ = _fp8_paged([3, 5], hkv, 16, 4, torch.tensor(1.0), torch.tensor(1.0))
    args = dict(q=torch.randn(2, 4, 16, dtype=torch.bfloat16), k_cache=k8, v_cache=v8,
                seqlens_k=torch.tensor([3, 5], dtype=torch.int32), block_table=table, scale=0.1,
                window_left=-1, softcap=0.0, sinks=None, k_scale=torch.tensor(0.5),
                v_scale=torch.full((hkv,), 0.5))
    args.update(over)
    return list(args.values())


DECODE_BAD = [
    (dict(k_scale=None), r"k_scale: required with a float8_e4m3fn k_cache \(a float32 tensor "
                         r"of shape \[\] or \[2\]"),
    (dict(v_scale=None), r"v_scale: required"),
    (dict(k_scale=torch.ones(3)), r"k_scale: expected a float32 tensor of shape \[\] or \[2\] "
                                  r"\(Hkv of k_cache\), got \[3\]"),
    (dict(v_scale=torch.ones(2, dtype=torch.float16)), r"v_scale: expected float32"),
    (dict(q=torch.randn(2, 4, 16)), r"q: a float8_e4m3fn k_cache is read by float16/bfloat16"),
    (dict(k_cache=torch.randn(8, 4, 2, 16, dtype=torch.bfloat16),
          v_cache=torch.randn(8, 4, 2, 16, dtype=torch.bfloat16)),
     r"k_scale: only float8_e4m3fn caches take scales, but k_cache is bfloat16"),
]


@pytest.mark.parametrize("over,msg", DECODE_BAD)
def test_scale_rules_fail_in_eager_and_at_trace_time(over, msg):
    with pytest.raises(ValueError, match=msg):
        torch.ops.attn.decode(*_decode_args(**over))
    torch._dynamo.reset()
    fn = torch.compile(torch.ops.attn.decode.default, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=msg):
        fn(*_decode_args(**over))


def test_store_scale_rules():
    k_cache = torch.zeros(2, 4, 2, 8, dtype=FP8)
    key = torch.randn(3, 2, 8)
    slots = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"k_scale: required with a float8_e4m3fn k_cache"):
        attn_ops.store_kvcache(key, key, k_cache, k_cache.clone(), slots)
    with pytest.raises(ValueError, match=r"key: expected a floating dtype to quantise"):
        attn_ops.store_kvcache(key.int(), key.int(), k_cache, k_cache.clone(), slots,
                               torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"v_scale: only float8_e4m3fn caches take scales"):
        attn_ops.store_kvcache(key, key, torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8), slots,
                               None, torch.tensor(1.0))


# opcheck's test_schema compares inputs before/after with torch.allclose, which CPU torch 2.13 lacks
# for float8 ("mul_cpu_reduced_float" not implemented): the other checks run, and
# test_fp8_inputs_are_not_mutated covers what test_schema would have found.
FP8_OPCHECK = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck_fp8():
    args = _decode_args(sinks=torch.randn(4))
    opcheck(torch.ops.attn.decode.default, args, test_utils=FP8_OPCHECK)
    opcheck(torch.ops.attn.decode_with_lse.default, args, test_utils=FP8_OPCHECK)
    k8, v8 = args[1], args[2]
    opcheck(torch.ops.attn.store_kvcache.default,
            (torch.randn(3, 2, 16, dtype=torch.bfloat16), torch.randn(3, 2, 16,
             dtype=torch.bfloat16), k8.clone(), v8.clone(), torch.tensor([0, -1, 9]),
             torch.tensor(0.5), torch.rand(2) + 0.5), test_utils=FP8_OPCHECK)
    q = torch.randn(6, 4, 16, dtype=torch.float16)
    opcheck(torch.ops.attn.prefill_with_lse.default,
            (q, k8, v8, cu_seqlens([2, 4]), cu_seqlens([3, 5]), 4, 5, 0.2, True, args[4], -1,
             0.0, None, torch.tensor(0.5), torch.tensor(2.0)), test_utils=FP8_OPCHECK)


def test_fp8_inputs_are_not_mutated():
    args = _decode_args(sinks=torch.randn(4))
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    torch.ops.attn.decode_with_lse(*args)
    after = [a for a in args if isinstance(a, torch.Tensor)]
    for x, y in zip(before, after):
        assert torch.equal(x.view(torch.uint8) if x.dtype == FP8 else x,
                           y.view(torch.uint8) if y.dtype == FP8 else y)


def test_store_then_decode_compiles_fullgraph():
    """One decode step on an FP8 cache (store the new token, then attend) in one graph."""
    hkv, d = 2, 16
    k_scale, v_scale = torch.tensor(0.5), torch.rand(hkv) + 0.5
    k8, v8, table, _, _ = _fp8_paged([3, 5], hkv, d, 4, k_scale, v_scale)
    seqlens = torch.tensor([4, 6], dtype=torch.int32)
    slots = (table[:, 0].long() * 4 + 3)  # position 3 of each first block: the new token
    q = torch.randn(2, 4, d, dtype=torch.bfloat16)
    new = torch.randn(2, hkv, d, dtype=torch.bfloat16)

    def step(q, new, k8, v8):
        torch.ops.attn.store_kvcache(new, new, k8, v8, slots, k_scale, v_scale)
        return torch.ops.attn.decode(q, k8, v8, seqlens, table, 0.25, -1, 0.0, None, k_scale,
                                     v_scale)

    k_eager, v_eager = k8.clone(), v8.clone()
    want = step(q, new, k_eager, v_eager)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(q, new, k8, v8)
    assert torch.equal(k8.view(torch.uint8), k_eager.view(torch.uint8))
    assert_close(got, want, 1e-2, 1e-2)
