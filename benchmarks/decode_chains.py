"""bench_decode.py ``--chains-only``: decode, and store + decode steps, captured back to back
in one CUDA graph, with and without programmatic dependent launches (see bench_decode.py's
docstring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common import device, print_table, write_csv
from decode_common import D, H, HKV


CHAIN_SHAPES = [(1, 32768), (4, 8192), (16, 2048), (16, 4096), (16, 8192), (24, 2048),
                (64, 2048)]


CHAIN = 20


def _chain_us(fn, smoke: bool, reps: int = 25) -> float:
    """Median us per call of CHAIN calls of ``fn`` captured in one CUDA graph (no L2 flush
    between: each call's K/V exceed the L2 at these shapes); smoke: one eager call, timed."""
    import time
    if smoke:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    from common import captured
    replay = captured(lambda: [fn() for _ in range(CHAIN)])
    for _ in range(3):
        replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CHAIN)
    return sorted(times)[len(times) // 2]


def chains(args, copy):
    """Decode calls, and store + decode steps, back to back in one CUDA graph: PDL on and off,
    beside SDPA's."""
    from attn_ops.backends.triton import decode_kernel, store_kernel
    dev = device(args)
    h, hkv, d = (4, 2, 32) if args.smoke else (H, HKV, D)
    shapes = [(2, 64)] if args.smoke else CHAIN_SHAPES
    rows = []
    for b, ctx in shapes:
        q = torch.randn(b, h, d, device=dev, dtype=torch.bfloat16)
        kc = torch.randn(b, hkv, ctx, d, device=dev, dtype=torch.bfloat16)  # SDPA's layout
        vc = torch.randn_like(kc)
        k, v = kc.transpose(1, 2), vc.transpose(1, 2)  # one page of ctx tokens per sequence
        seqlens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        one = torch.arange(b, dtype=torch.int32, device=dev)[:, None]
        k_new = torch.randn(b, hkv, d, device=dev, dtype=torch.bfloat16)
        v_new = torch.randn_like(k_new)
        slots = (torch.arange(b, device=dev) * ctx + ctx - 1).to(torch.int32)  # the last slot

        def sdpa():
            return F.scaled_dot_product_attention(q.view(b, h, 1, d), kc, vc, scale=d ** -0.5,
                                                  enable_gqa=True)

        def sdpa_step():
            kc[:, :, ctx - 1].copy_(k_new)
            vc[:, :, ctx - 1].copy_(v_new)
            return sdpa()

        def ours(pdl):
            return lambda: decode_kernel.decode(q, k, v, seqlens, one, d ** -0.5, pdl=pdl)

        def ours_step(pdl):
            def step():
                store_kernel.store_kvcache(k_new, v_new, k, v, slots, pdl=pdl)
                return decode_kernel.decode(q, k, v, seqlens, one, d ** -0.5, pdl=pdl)
            return step
        variants = {("decode", "sdpa"): sdpa, ("decode", "ours, PDL"): ours(True),
                    ("decode", "ours, no PDL"): ours(False),
                    ("store + decode", "slice copies + sdpa"): sdpa_step,
                    ("store + decode", "ours, PDL"): ours_step(True),
                    ("store + decode", "ours, no PDL"): ours_step(False)}
        times = {key: [] for key in variants}
        for _ in range(1 if args.smoke else 3):
            for key, fn in variants.items():
                times[key].append(_chain_us(fn, args.smoke))
        for (step, name), ts in times.items():
            us = sorted(ts)[len(ts) // 2]
            base = sorted(times[(step, "sdpa" if step == "decode" else "slice copies + sdpa")])
            rows.append(dict(bench="decode_chains", batch=b, ctx=ctx, step=step, contender=name,
                             us_per_call=us, vs_sdpa=base[len(base) // 2] / us))
        print_table([r for r in rows if (r["batch"], r["ctx"]) == (b, ctx)],
                    ["batch", "ctx", "step", "contender", "us_per_call", "vs_sdpa"])
    write_csv(args.out / "decode_chains.csv", rows)
