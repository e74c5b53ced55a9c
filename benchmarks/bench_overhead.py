"""Eager host overhead per op call: the custom-op path (dispatcher, metadata checks, registry)
and the bare kernel wrapper, beside plain torch calls of similar size.

Tiny shapes, so the GPU work (a few us) hides behind the host: ``host_us`` is the wall time of
2000 back-to-back calls divided by 2000, measured before the final synchronize (launches are
asynchronous and the queue never fills); ``gpu_us`` is the device time of one call (do_bench).

    python benchmarks/bench_overhead.py [--out DIR]
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from common import bench_ms, device, header, parse_args, print_table, write_csv

CALLS = 2000


def host_us(fn, calls: int, sync: bool) -> float:
    for _ in range(50):
        fn()
    if sync:
        torch.accelerator.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if sync:
        torch.accelerator.synchronize()
    return elapsed / calls * 1e6


def cases(dev):
    import attn_ops
    from attn_ops.backends.triton import decode_kernel, prefill_kernel, store_kernel
    hkv, h, d, page = 8, 32, 128, 16
    bf = torch.bfloat16
    k_cache = torch.randn(4, page, hkv, d, device=dev, dtype=bf)
    v_cache = torch.randn_like(k_cache)
    key = torch.randn(1, hkv, d, device=dev, dtype=bf)
    slots = torch.tensor([5], device=dev)
    q1 = torch.randn(1, h, d, device=dev, dtype=bf)
    seqlens = torch.tensor([16], dtype=torch.int32, device=dev)
    table = torch.tensor([[2]], dtype=torch.int32, device=dev)
    qp = torch.randn(16, h, d, device=dev, dtype=bf)
    kp = torch.randn(16, hkv, d, device=dev, dtype=bf)
    cu = torch.tensor([0, 16], dtype=torch.int32, device=dev)
    ops = torch.ops.attn
    qd, kd = q1.view(1, h, 1, d), k_cache[2].transpose(0, 1)[None]
    k_flat = k_cache.view(-1, hkv, d)
    return {
        "store_kvcache": {
            "attn_ops.store_kvcache(backend='triton')":
                lambda: attn_ops.store_kvcache(key, key, k_cache, v_cache, slots, backend="triton"),
            "torch.ops.attn.store_kvcache (env choice)":
                lambda: ops.store_kvcache(key, key, k_cache, v_cache, slots),
            "kernel wrapper only":
                lambda: store_kernel.store_kvcache(key, key, k_cache, v_cache, slots),
            "torch index_copy_ x2":
                lambda: (k_flat.index_copy_(0, slots, key), k_flat.index_copy_(0, slots, key)),
        },
        "decode": {
            "attn_ops.decode(backend='triton')":
                lambda: attn_ops.decode(q1, k_cache, v_cache, seqlens, table, 0.08,
                                        backend="triton"),
            "torch.ops.attn.decode (env choice)":
                lambda: ops.decode(q1, k_cache, v_cache, seqlens, table, 0.08),
            "kernel wrapper only":
                lambda: decode_kernel.decode(q1, k_cache, v_cache, seqlens, table, 0.08),
            "F.scaled_dot_product_attention":
                lambda: F.scaled_dot_product_attention(qd, kd, kd, enable_gqa=True),
        },
        "prefill": {
            "attn_ops.prefill(backend='triton')":
                lambda: attn_ops.prefill(qp, kp, kp, cu, cu, 16, 16, 0.08, backend="triton"),
            "torch.ops.attn.prefill (env choice)":
                lambda: ops.prefill(qp, kp, kp, cu, cu, 16, 16, 0.08),
            "kernel wrapper only":
                lambda: prefill_kernel.prefill(qp, kp, kp, cu, cu, 16, 16, 0.08),
        },
    }


def profile(paths: dict, calls: int) -> None:
    """Print where the host time of each path goes (cProfile, top functions by own time)."""
    import cProfile
    import pstats
    for name, fn in paths.items():
        fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        print(f"--- profile: {name} ({calls} calls)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def main():
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--profile", action="store_true", help="also cProfile the decode and store paths"))
    os.environ["ATTN_OPS_BACKEND"] = "triton"  # for the torch.ops.attn.* rows
    env = header("host overhead", args.smoke)
    dev = device(args)
    calls = 20 if args.smoke else CALLS
    rows = []
    for op, paths in cases(dev).items():
        for path, fn in paths.items():
            us = host_us(fn, calls, not args.smoke)
            gpu = bench_ms(fn, args.smoke) * 1e3
            rows.append(dict(bench="overhead", op=op, path=path, host_us=us, gpu_us=gpu,
                             device=env["device"], date=env["date"], torch=env["torch"],
                             triton=env["triton"]))
    write_csv(args.out / "overhead.csv", rows)
    print_table(rows, ["op", "path", "host_us", "gpu_us"])
    if args.profile:
        all_cases = cases(dev)
        profile({f"{op}: {path}": all_cases[op][path] for op in ("store_kvcache", "decode")
                 for path in list(all_cases[op])[:3]}, calls)


if __name__ == "__main__":
    main()
