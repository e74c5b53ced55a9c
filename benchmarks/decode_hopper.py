"""bench_decode.py ``--hopper-only``: the balanced Gluon Hopper decode beside the Triton
kernels and SDPA (see bench_decode.py's docstring)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from common import device, print_table, write_csv
from decode_common import D, H, HKV


HOPPER_SHAPES = [(8, 4096), (12, 4096), (13, 2048), (13, 8192), (16, 1024), (16, 2048),
                 (16, 4096), (16, 8192), (16, 16384), (16, 32768), (20, 2048), (24, 2048),
                 (24, 8192), (28, 4096), (32, 2048), (33, 2048), (34, 2048), (40, 2048),
                 (48, 2048)]


# Batches of unequal lengths over the same cache: (B, ctx, lengths, what they are).
HOPPER_SKEWED = [(16, 8192, [8192] * 4 + [512] * 12, "4 x 8192, 12 x 512"),
                 (16, 16384, [16384] + [1024] * 15, "1 x 16384, 15 x 1024"),
                 (32, 8192, [(7919 * i) % 8192 + 1 for i in range(32)], "32 of 1-8192")]


def _without_hopper_route(fn, *args):
    """``fn(*args)`` with the Triton backend's Gluon decode route off (decode_plan)."""
    from attn_ops.backends.triton import decode_plan
    decode_plan.HOPPER_DECODE = False
    try:
        return fn(*args)
    finally:
        decode_plan.HOPPER_DECODE = True


def hopper(args, copy):
    """The Gluon Hopper decode beside the Triton plan and SDPA (see the module docstring)."""
    import attn_ops
    from attn_ops.backends.triton import decode_kernel
    from attn_ops.backends.triton import hopper_decode_launch as hd
    from common import bench_ms
    dev = device(args)
    if args.smoke or not hd.available(dev):
        print("--hopper-only: needs an sm90 GPU and Gluon's Hopper API")
        return
    cases = [(b, ctx, None, "uniform") for b, ctx in HOPPER_SHAPES] + HOPPER_SKEWED
    rows = []
    for b, ctx, lens, what in cases:
        q = torch.randn(b, H, D, device=dev, dtype=torch.bfloat16)
        kc = torch.randn(b, HKV, ctx, D, device=dev, dtype=torch.bfloat16)  # SDPA's layout
        vc = torch.randn_like(kc)
        seqlens = torch.tensor(lens or [ctx] * b, dtype=torch.int32, device=dev)
        one = torch.arange(b, dtype=torch.int32, device=dev)[:, None]
        cache = (q, kc.transpose(1, 2), vc.transpose(1, 2), seqlens, one, D ** -0.5)
        variants = {
            "attn.decode (triton backend)": lambda: attn_ops.decode(*cache, backend="triton"),
            "triton kernels": lambda: _without_hopper_route(decode_kernel.decode, *cache),
            "gluon hopper decode": lambda: hd.decode(*cache),
        }
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        for progs in (sms, 2 * sms):  # the grid rule's alternatives: every SM busy
            if progs != hd.programs(b, HKV, sms):
                variants[f"gluon, {progs} programs"] = functools.partial(
                    hd.decode, *cache, progs=progs)
        if lens is None:
            variants["sdpa"] = lambda: F.scaled_dot_product_attention(
                q.view(b, H, 1, D), kc, vc, scale=D ** -0.5, enable_gqa=True)
        times = {name: [] for name in variants}
        for _ in range(3):
            for name, fn in variants.items():
                times[name].append(bench_ms(fn, graph=True))
        base = min(times["sdpa" if lens is None else "triton kernels"])
        read = 2 * HKV * D * 2 * int(seqlens.sum())
        for name in variants:
            ms = min(times[name])
            gbs = read / (ms * 1e-3) / 1e9
            rows.append(dict(bench="decode_hopper", batch=b, ctx=ctx,
                             lengths=what,
                             contender=name, graph_us=ms * 1e3, vs_base=base / ms, gbs=gbs,
                             pct_copy=100 * gbs / copy))
        print_table(rows[-len(variants):], ["batch", "ctx", "lengths", "contender", "graph_us",
                                            "vs_base", "gbs", "pct_copy"])
        write_csv(args.out / "decode_hopper.csv", rows)  # each case: a run cut short keeps its rows
