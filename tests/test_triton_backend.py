"""The Triton backend through the Triton CPU interpreter, against the reference backend.

Shapes are tiny (the interpreter runs each program in numpy) but cover the contract's corners:
GQA/MQA, causal and not, sliding window, softcap, paged prefix caches with shuffled blocks and
garbage table entries, padding (slot -1, seqlens 0), empty sequences, odd lengths, int32/int64
slots, a padded head dim (40 -> 64). Outputs are poisoned with NaN first so an unwritten element
fails. On a machine with a GPU these run only when TRITON_INTERPRET=1 was set before pytest (the
kernels are then interpreted for the whole session); tests/test_cuda_triton.py covers the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are first imported

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton interpreter tests need TRITON_INTERPRET=1 (set before pytest)",
                allow_module_level=True)

import attn_ops  # noqa: E402
from attn_ops import registry  # noqa: E402
from attn_ops.backends import reference  # noqa: E402
from attn_ops.backends import triton as tb  # noqa: E402
from attn_ops.backends.triton import decode_kernel, prefill_kernel  # noqa: E402
from tests.support.helpers import TOLERANCES, assert_close, cu_seqlens, prefill_f64, random_paged  # noqa: E402

HALF = (torch.float16, torch.bfloat16)


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# supports() and lazy import
# ---------------------------------------------------------------------------------------------

def _config(**over):
    cfg = dict(device=torch.device("cuda"), dtype=torch.bfloat16, head_dim=128, num_heads=32,
               num_kv_heads=8, causal=True, paged=True, block_size=16, window_left=-1,
               softcap=0.0)
    cfg.update(over)
    return cfg


def test_supports_reasons(monkeypatch):
    assert tb.supports("prefill", **_config()) is None
    assert tb.supports("decode", **_config(head_dim=96, block_size=24)) is None
    assert tb.supports("store_kvcache", **_config(device=torch.device("cpu"))) is None
    assert "int8" in tb.supports("decode", **_config(dtype=torch.int8))
    assert "head dim 512" in tb.supports("prefill", **_config(head_dim=512))
    assert "'mps'" in tb.supports("decode", **_config(device=torch.device("mps")))
    assert "block size 0" in tb.supports("decode", **_config(block_size=0))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in tb.supports("decode", **_config(device=torch.device("cpu")))


def test_importing_the_backend_imports_no_triton():
    code = ("import sys, attn_ops, attn_ops.backends.triton as t; "
            "assert 'triton' not in sys.modules, 'triton imported'; print(t.name)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "triton"


# ---------------------------------------------------------------------------------------------
# store_kvcache
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("block_size,hkv,d", [(16, 2, 32), (32, 1, 64), (24, 3, 40)])
def test_store_kvcache(slot_dtype, block_size, hkv, d):
    dtype = torch.bfloat16
    num_blocks, t = 5, 13
    k_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    # key/value as strided views of a fused [T, 3, Hkv, D] projection (token stride != Hkv*D)
    fused = torch.randn(t, 3, hkv, d, dtype=dtype)
    key, value = fused[:, 0], fused[:, 2]
    slots = torch.randperm(num_blocks * block_size)[:t].to(slot_dtype)
    slots[[2, 7]] = -1
    k_ours, v_ours = k_cache.clone(), v_cache.clone()
    attn_ops.store_kvcache(key, value, k_ours, v_ours, slots, backend="triton")
    reference.store_kvcache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_ours, k_cache) and torch.equal(v_ours, v_cache)


def test_store_kvcache_all_padding_and_empty():
    k_cache = torch.randn(2, 16, 2, 32, dtype=torch.float16)
    v_cache = torch.randn_like(k_cache)
    before = k_cache.clone(), v_cache.clone()
    key = torch.randn(4, 2, 32, dtype=torch.float16)
    attn_ops.store_kvcache(key, key, k_cache, v_cache, torch.full((4,), -1), backend="triton")
    attn_ops.store_kvcache(key[:0], key[:0], k_cache, v_cache, torch.zeros(0, dtype=torch.int32),
                           backend="triton")
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


# ---------------------------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------------------------

def _dense_batch(lens_q, lens_k, h, hkv, d, dtype, extra_rows=0):
    q = torch.randn(sum(lens_q) + extra_rows, h, d, dtype=dtype)
    k = torch.randn(sum(lens_k), hkv, d, dtype=dtype)
    v = torch.randn_like(k)
    return q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k)


def _check_prefill(q, k, v, cu_q, cu_k, max_q, max_k, causal, block_table=None, window_left=-1,
                   softcap=0.0):
    scale = q.shape[-1] ** -0.5
    out = _poisoned(q.shape, q.dtype)
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


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------

def _check_decode(lens, h, hkv, d, block_size, dtype, window_left=-1, softcap=0.0, splits=None,
                  table_width=None):
    paged = random_paged(lens, hkv, d, block_size, dtype, table_width=table_width)
    q = torch.randn(len(lens), h, d, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    out = _poisoned(q.shape, dtype)
    decode_kernel.decode(q, paged.k_cache, paged.v_cache, seqlens, paged.block_table, d ** -0.5,
                         window_left, softcap, splits=splits, out=out)
    ref = reference.decode(q, paged.k_cache, paged.v_cache, seqlens, paged.block_table,
                           d ** -0.5, window_left, softcap)
    assert_close(out, ref, *TOLERANCES[dtype], what="decode")
    return out


@pytest.mark.parametrize("splits", [None, 1, 3, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_splits_and_padding(splits, block_size):
    # seqlens 0 (padded row), 1, odd; 8 splits of a 40-token sequence leave splits empty
    out = _check_decode([13, 0, 40, 1], 4, 2, 32, block_size, torch.bfloat16, splits=splits,
                        table_width=4)
    assert torch.all(out[1] == 0)


@pytest.mark.parametrize("window_left,softcap", [(5, 0.0), (-1, 3.0), (0, 2.0)])
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_window_softcap(window_left, softcap, splits):
    _check_decode([13, 37, 2], 4, 2, 32, 16, torch.float16, window_left, softcap, splits=splits)


@pytest.mark.parametrize("h,hkv,d", [(4, 1, 32), (2, 2, 64), (2, 1, 40)])
def test_decode_heads_and_dims(h, hkv, d):
    _check_decode([19, 6], h, hkv, d, 16, torch.float16, splits=2)


def test_decode_fp32_and_through_op():
    lens = [17, 0, 5]
    paged = random_paged(lens, 2, 32, 16, torch.float32)
    q = torch.randn(3, 4, 32)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    out = attn_ops.decode(q, paged.k_cache, paged.v_cache, seqlens, paged.block_table, 0.2,
                          backend="triton")
    ref = attn_ops.decode(q, paged.k_cache, paged.v_cache, seqlens, paged.block_table, 0.2,
                          backend="reference")
    assert_close(out, ref, *TOLERANCES[torch.float32])


def test_decode_split_count_is_static():
    # A pure function of (B, Hkv, capacity, SMs): lengths never enter.
    assert decode_kernel.num_splits(1, 8, 32768, 132, 64) > 1
    assert decode_kernel.num_splits(128, 8, 2048 * 16, 132, 64) == 1
    assert decode_kernel.num_splits(1, 8, 64, 132, 64) == 1  # a tiny table: no split
    assert decode_kernel.num_splits(0, 8, 1024, 132, 64) == 1
    assert decode_kernel.num_splits(1, 1, 10 ** 7, 132, 64) == decode_kernel._MAX_SPLITS


# ---------------------------------------------------------------------------------------------
# graph capture by torch.compile (the op stays one opaque call; the backend runs inside it)
# ---------------------------------------------------------------------------------------------

def test_compiled_store_then_decode_runs_triton_backend():
    torch._dynamo.reset()
    lens = [9, 20]
    paged = random_paged(lens, 2, 32, 16, torch.float16)
    q = torch.randn(2, 4, 32, dtype=torch.float16)
    new_k = torch.randn(2, 2, 32, dtype=torch.float16)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    flat = paged.block_table.long() * 16
    slots = torch.stack([flat[0, 0] + 8, flat[1, 1] + 3])  # the last token of each sequence

    def step(q, new_k, k_cache, v_cache, slots, seqlens, table):
        attn_ops.store_kvcache(new_k, new_k, k_cache, v_cache, slots)
        return attn_ops.decode(q, k_cache, v_cache, seqlens, table, 0.25)

    caches_ref = paged.k_cache.clone(), paged.v_cache.clone()
    expected = step(q, new_k, *caches_ref, slots, seqlens, paged.block_table)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with registry.use_backend("triton"):
        got = compiled(q, new_k, paged.k_cache, paged.v_cache, slots, seqlens, paged.block_table)
    assert torch.equal(paged.k_cache, caches_ref[0])
    assert_close(got, expected, *TOLERANCES[torch.float16])
