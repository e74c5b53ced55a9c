"""store_kvcache's Triton kernel (store_kernel.py): the interpreter at tiny shapes (CI) and, marked
``cuda``, compiled on a GPU; always against the reference backend."""

from __future__ import annotations

import pytest
import torch

import attn_ops
from attn_ops.backends import reference
from tests.support.helpers import (TOLERANCES, assert_close, cu_seqlens, poisoned, prefill_f64,
                                   random_paged)

triton = pytest.importorskip("triton")
from attn_ops.backends.triton import store_kernel  # noqa: E402  (imports triton)

HALF = (torch.float16, torch.bfloat16)
BF16, FP16 = torch.bfloat16, torch.float16
DEV = "cuda"


def _nan(shape, dtype):
    return poisoned(shape, dtype, DEV)



# ---------------------------------------------------------------------------------------------
# interpreter
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


def _strided_cache(num_blocks, block_size, hkv, d, dtype):
    """A ``[num_blocks, block_size, Hkv, D]`` view of a ``[num_blocks, Hkv, block_size, D]``
    tensor: block stride Hkv*page*D, in-page stride D, head stride page*D (not contiguous)."""
    return torch.randn(num_blocks, hkv, block_size, d, dtype=dtype).transpose(1, 2)


def test_store_kvcache_strided_slot_mapping_through_op():
    # Issue 12: a [::2] slot view was read as dense (slots 0, 5, 7 instead of 0, 5, 9).
    k_cache = torch.randn(2, 8, 1, 16, dtype=torch.float16)
    v_cache = torch.randn_like(k_cache)
    key = torch.randn(3, 1, 16, dtype=torch.float16)
    value = torch.randn_like(key)
    slots = torch.tensor([0, 7, 5, 11, 9, 13])[::2]
    assert slots.stride(0) == 2
    before_k, before_v = k_cache.clone(), v_cache.clone()
    attn_ops.store_kvcache(key, value, k_cache, v_cache, slots, backend="triton")
    flat_k, flat_v = k_cache.view(-1, 1, 16), v_cache.view(-1, 1, 16)
    assert torch.equal(flat_k[[0, 5, 9]], key) and torch.equal(flat_v[[0, 5, 9]], value)
    untouched = [s for s in range(16) if s not in (0, 5, 9)]
    assert torch.equal(flat_k[untouched], before_k.view(-1, 1, 16)[untouched])
    assert torch.equal(flat_v[untouched], before_v.view(-1, 1, 16)[untouched])


@pytest.mark.parametrize("block_size,hkv,d", [(16, 2, 32), (5, 3, 40)])
def test_store_kvcache_strided_caches_and_slots(block_size, hkv, d):
    # Caches may be any strided [blocks, page, Hkv, D] view with a contiguous last dim.
    dtype, num_blocks, t = torch.bfloat16, 4, 13
    k_cache = _strided_cache(num_blocks, block_size, hkv, d, dtype)
    v_cache = _strided_cache(num_blocks, block_size, hkv, d, dtype)
    assert not k_cache.is_contiguous()
    key, value = torch.randn(2, t, hkv, d, dtype=dtype)
    slots = torch.stack([torch.randperm(num_blocks * block_size)[:t],
                         torch.randint(0, 99, (t,))], 1)[:, 0]  # column of a [T, 2] tensor
    slots[[1, 6]] = -1
    k_ref, v_ref = k_cache.contiguous(), v_cache.contiguous()
    store_kernel.store_kvcache(key, value, k_cache, v_cache, slots)
    reference.store_kvcache(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def _fp8_store_case(t, hkv, d, block_size, scale_shape, dtype, device="cpu"):
    """Keys spanning e4m3fn's range (subnormals to saturation, +-inf, NaN), per-head or one scale;
    the cache starts as random finite bytes (never zeros: a stray zero written past a row, or
    into a slot no token owns, must show)."""
    num_blocks = t // block_size + 3
    bits = torch.randint(1, 0x7F, (num_blocks, block_size, hkv, d), dtype=torch.uint8)
    bits |= torch.randint(0, 2, bits.shape, dtype=torch.uint8) << 7  # either sign; 0x7F is NaN
    k_cache = bits.view(torch.float8_e4m3fn).to(device)
    magnitude = torch.logspace(-5, 3.5, d, device=device)  # 1e-5 .. ~3162
    key = (torch.randn(t, hkv, d, device=device) * magnitude).to(dtype)
    value = torch.randn(t, hkv, d, device=device).to(dtype)
    key[0, 0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    slots = torch.randperm(num_blocks * block_size, device=device)[:t]
    slots[1::5] = -1
    scales = (torch.rand(scale_shape, device=device) + 0.5, torch.rand(scale_shape, device=device))
    return key, value, k_cache, slots, scales


@pytest.mark.parametrize("scale_shape", [(), (3,)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_store_kvcache_fp8_is_bitwise_the_reference(scale_shape, dtype):
    """saturate(x / scale), ties to even, NaN kept: the same bytes as the reference's torch cast."""
    key, value, k_cache, slots, (k_scale, v_scale) = _fp8_store_case(9, 3, 24, 4, scale_shape,
                                                                     dtype)
    v_cache = k_cache.clone()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    attn_ops.store_kvcache(key, value, k_cache, v_cache, slots, k_scale, v_scale, backend="triton")
    reference.store_kvcache(key, value, k_ref, v_ref, slots, k_scale, v_scale)
    assert torch.equal(k_cache.view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), v_ref.view(torch.uint8))


def test_store_kvcache_fp8_rounds_every_midpoint_to_even():
    grid = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = torch.cat([(grid[:-1] + grid[1:]) / 2, grid, torch.tensor([449.0, 464.0, 1e30])])
    n = mids.numel()
    key = torch.stack([mids, -mids], 1).reshape(n, 2, 1).expand(n, 2, 8).contiguous()
    k_cache = torch.zeros(n, 1, 2, 8, dtype=torch.float8_e4m3fn)
    v_cache = torch.zeros_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    one = torch.tensor(1.0)
    store_kernel.store_kvcache(key, key, k_cache, v_cache, torch.arange(n), one, one)
    reference.store_kvcache(key, key, k_ref, v_ref, torch.arange(n), one, one)
    assert torch.equal(k_cache.view(torch.uint8), k_ref.view(torch.uint8))


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t,hkv,d,block_size,slot_dtype,dtype", [
    (1, 8, 128, 16, torch.int32, BF16), (64, 8, 128, 16, torch.int64, BF16),
    (123, 1, 64, 32, torch.int32, FP16), (4099, 8, 128, 256, torch.int64, BF16),
    (77, 3, 96, 64, torch.int64, FP16), (300, 2, 256, 128, torch.int32, BF16),
    (50, 4, 128, 24, torch.int32, torch.float32)])
@pytest.mark.cuda
def test_store_kvcache_cuda(t, hkv, d, block_size, slot_dtype, dtype):
    num_blocks = t // block_size + 4
    k_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=DEV)
    v_cache = torch.randn_like(k_cache)
    fused = torch.randn(t, 2, hkv, d, dtype=dtype, device=DEV)  # strided key/value views
    key, value = fused[:, 0], fused[:, 1]
    slots = torch.randperm(num_blocks * block_size, device=DEV)[:t].to(slot_dtype)
    slots[::7] = -1
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kernel.store_kvcache(key, value, k_cache, v_cache, slots)
    reference.store_kvcache(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.cuda
def test_store_kvcache_is_one_launch_cuda():
    k_cache = torch.randn(64, 16, 8, 128, dtype=BF16, device=DEV)
    v_cache = torch.randn_like(k_cache)
    key = torch.randn(64, 8, 128, dtype=BF16, device=DEV)
    slots = torch.randperm(1024, device=DEV)[:64]
    store_kernel.store_kvcache(key, key, k_cache, v_cache, slots)  # compile outside the profile
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        store_kernel.store_kvcache(key, key, k_cache, v_cache, slots)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]



@pytest.mark.parametrize("scale_shape", [(), (8,)])
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.cuda
def test_store_kvcache_fp8_cuda(scale_shape, dtype):
    key, value, k_cache, slots, (k_scale, v_scale) = _fp8_store_case(300, 8, 128, 16, scale_shape,
                                                                     dtype, DEV)
    v_cache = k_cache.clone()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kernel.store_kvcache(key, value, k_cache, v_cache, slots, k_scale, v_scale)
    reference.store_kvcache(key, value, k_ref, v_ref, slots, k_scale, v_scale)
    assert torch.equal(k_cache.view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), v_ref.view(torch.uint8))
