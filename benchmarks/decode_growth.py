"""bench_decode.py ``--growth``: the contract growth's decode against bf16 (FP8 caches, sinks,
the LSE output) on the same cache tokens (see bench_decode.py's docstring)."""

from __future__ import annotations

import torch

from common import device, print_table, write_csv
from decode_common import D, H, HKV, paged_copy


# B 20 x 4096: between the FP8 plan's rows (two splits at 2.4 programs per SM), under the
# target's B >= 16, ctx >= 4096
GROWTH_SHAPES = [(16, 4096), (16, 8192), (20, 4096), (32, 8192), (64, 4096), (128, 4096),
                 (8, 4096), (16, 2048), (24, 4096), (32, 4096), (48, 4096)]


def growth(args, copy):
    """bf16 vs FP8 caches vs sinks vs the lse, one shape at a time, the variants interleaved."""
    import attn_ops
    from attn_ops.backends import reference
    from attn_ops.backends.triton import decode_kernel, decode_plan
    from attn_ops.backends.triton.common import device_sm_count
    from common import bench_ms
    dev = device(args)
    h, hkv, d = (4, 2, 32) if args.smoke else (H, HKV, D)
    shapes = [(2, 64)] if args.smoke else GROWTH_SHAPES
    rows = []
    for b, ctx in shapes:
        k = torch.randn(b, ctx, hkv, d, device=dev, dtype=torch.bfloat16)
        k_cache, v_cache, table = paged_copy(k, torch.randn_like(k), 16, dev)
        del k
        k_scale = torch.rand(hkv, device=dev) * 0.01 + 0.01  # |x| < ~5 over 448
        v_scale = torch.rand(hkv, device=dev) * 0.01 + 0.01
        k8 = reference.quantize_fp8(k_cache, k_scale, torch.float8_e4m3fn)
        v8 = reference.quantize_fp8(v_cache, v_scale, torch.float8_e4m3fn)
        q = torch.randn(b, h, d, device=dev, dtype=torch.bfloat16)
        sinks = torch.randn(h, device=dev)
        seqlens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        base = (q, k_cache, v_cache, seqlens, table, d ** -0.5, -1, 0.0)
        fp8 = (q, k8, v8, seqlens, table, d ** -0.5, -1, 0.0, None, k_scale, v_scale)
        variants = {
            "bf16": (attn_ops.decode, base, 2),
            "fp8 per-head scales": (attn_ops.decode, fp8, 1),
            "bf16 + sinks": (attn_ops.decode, base + (sinks,), 2),
            "bf16 decode_with_lse": (attn_ops.decode_with_lse, base, 2),
            "bf16 + sinks + lse": (attn_ops.decode_with_lse, base + (sinks,), 2),
            "fp8 + sinks + lse": (attn_ops.decode_with_lse, fp8[:8] + (sinks,) + fp8[9:], 1),
        }
        # FP8's two launch rows forced (kernel wrapper, not the op path): FP8_CONFIG with the
        # wave rule's splits, and FP8_DEEP_CONFIG with its own (decode_plan); and the default
        # with the cache widened to bf16 instead of fp16
        deep = decode_plan.fp8_deep_splits(b * hkv, device_sm_count(dev), ctx) or 1
        forced = {"fp8 FP8_CONFIG row": dict(config=decode_plan.FP8_CONFIG),
                  f"fp8 FP8_DEEP_CONFIG row, {deep} splits": dict(
                      config=decode_plan.FP8_DEEP_CONFIG, splits=deep),
                  "fp8 via bf16": dict(fp8_via_f16=False)}
        for name, kw in forced.items():
            variants[name] = (lambda *a, kw=kw: decode_kernel.decode(
                *a[:6], k_scale=a[9], v_scale=a[10], **kw), fp8, 1)
        times = {name: [] for name in variants}
        for _ in range(1 if args.smoke else 3):
            for name, (op, a, _) in variants.items():
                kw = {} if op.__module__ == __name__ else {"backend": "triton"}
                run = lambda op=op, a=a, kw=kw: op(*a, **kw)  # noqa: E731
                times[name].append(bench_ms(run, args.smoke, graph=not args.smoke))
        ref = sorted(times["bf16"])[len(times["bf16"]) // 2]
        for name, (_, _, elem) in variants.items():  # elem: bytes per cache element
            ms = sorted(times[name])[len(times[name]) // 2]
            gbs = 2 * b * ctx * hkv * d * elem / (ms * 1e-3) / 1e9
            rows.append(dict(bench="decode_growth", batch=b, ctx=ctx, contender=name,
                             graph_us=ms * 1e3, speed_vs_bf16=ref / ms,
                             cost_pct=100 * (ms / ref - 1), gbs=gbs, pct_copy=100 * gbs / copy))
        print_table([r for r in rows if (r["batch"], r["ctx"]) == (b, ctx)],
                    ["batch", "ctx", "contender", "graph_us", "speed_vs_bf16", "cost_pct",
                     "gbs", "pct_copy"])
    write_csv(args.out / "decode_growth.csv", rows)
