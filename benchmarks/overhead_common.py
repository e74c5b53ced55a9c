"""What the host-overhead benchmarks share (bench_overhead.py, overhead_cpu.py,
overhead_hopper.py): the call count, the back-to-back host timing and the tiny calls' inputs."""

from __future__ import annotations

import time
import types
from collections.abc import Callable

import torch

CALLS = 2000


def host_us(fn, calls: int, sync: bool, repeats: int = 3) -> float:
    """The least of ``repeats`` timings of ``calls`` back-to-back calls, per call (host time
    on a shared machine only grows with interference: the least is the steadiest)."""
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if sync:
            torch.accelerator.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - start)
        if sync:
            torch.accelerator.synchronize()
    return best / calls * 1e6


def tiny_inputs(dev, b=1):
    """The tiny calls' tensors on ``dev`` (bf16, 32 / 8 heads, D 128, pages of 16): B
    sequences of 16 cached keys (one page each, table width 1) and their store and decode
    arguments, a 16-token prompt, SDPA's dense slices of the same cache, and 2 x 256 prompts
    over 8 / 2 heads for the Hopper prefill route."""
    hkv, h, d, page = 8, 32, 128, 16
    bf = torch.bfloat16
    t = types.SimpleNamespace()
    t.k_cache = torch.randn(4 * b, page, hkv, d, device=dev, dtype=bf)
    t.v_cache = torch.randn_like(t.k_cache)
    t.key = torch.randn(b, hkv, d, device=dev, dtype=bf)
    t.slots = torch.arange(b, device=dev) * 4 * page + 5
    t.q1 = torch.randn(b, h, d, device=dev, dtype=bf)
    t.seqlens = torch.full((b,), 16, dtype=torch.int32, device=dev)
    t.table = (torch.arange(b, dtype=torch.int32, device=dev) * 4 + 2)[:, None].contiguous()
    t.qp = torch.randn(16, h, d, device=dev, dtype=bf)
    t.kp = torch.randn(16, hkv, d, device=dev, dtype=bf)
    t.cu = torch.tensor([0, 16], dtype=torch.int32, device=dev)
    t.qd = t.q1.view(b, h, 1, d)
    t.kd = t.k_cache.view(b, 4, page, hkv, d)[:, 2].transpose(1, 2)  # [b, Hkv, 16, D]
    t.k_flat = t.k_cache.view(-1, hkv, d)
    # 2 x 256 prompts, 8 / 2 heads (GPU time below the host's): the Hopper route's launches
    # (sm90), eager threshold lifted (see main)
    t.qh = torch.randn(512, 8, d, device=dev, dtype=bf)
    t.kh, t.vh = (torch.randn(512, 2, d, device=dev, dtype=bf) for _ in range(2))
    t.cuh = torch.tensor([0, 256, 512], dtype=torch.int32, device=dev)
    return t


def bound_decode_routes(dev) -> tuple[tuple, Callable, Callable] | None:
    """The Triton backend's bound decode (what the op path's memo calls) on each of its routes
    for a bf16 decode of 16 sequences of 16 keys (128 (sequence, KV head) pairs, which the Gluon
    Hopper decode takes on an H100 / H200: decode_plan.HOPPER_DECODE): ``(args, the Gluon
    route's bound function, the Triton kernels' (bound with the route off))``, or None where
    the call is not on the route."""
    from attn_ops.backends.triton import decode_kernel, decode_plan
    u = tiny_inputs(dev, b=16)
    args = (u.q1, u.k_cache, u.v_cache, u.seqlens, u.table, 0.08)
    if not decode_kernel.hopper_route(u.q1, u.k_cache, u.v_cache, u.table):
        return None
    gluon = decode_kernel.bind_decode(*args)
    decode_plan.HOPPER_DECODE = False
    try:
        triton_kernels = decode_kernel.bind_decode(*args)
    finally:
        decode_plan.HOPPER_DECODE = True
    return args, gluon, triton_kernels
