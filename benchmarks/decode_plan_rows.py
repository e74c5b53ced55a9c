"""bench_decode.py ``--skewed``, ``--plans-only``, ``--kv-offsets-only`` and ``--tune``: the
Triton decode's kernels and plan rows side by side (split against balanced kernel on unequal
lengths, the few-sequence plan rows, K/V offsets, the launch-config sweep); see
bench_decode.py's docstring."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common import device, print_table, time_contender, try_time, write_csv
from decode_common import D, H, HKV, default_plan, kv_bytes, paged_copy


def skewed_batches(smoke: bool) -> dict[str, list[int]]:
    """name -> sequence lengths (fixed seed)."""
    import random
    rng = random.Random(0)
    if smoke:
        return {"2: 1x200 + 1x8": [200, 8]}
    return {"16: 1x16384 + 15x1024": [16384] + [1024] * 15,
            "16: 2x8192 + 14x512": [8192] * 2 + [512] * 14,
            "8: 1x32768 + 7x256": [32768] + [256] * 7,
            "32: 2x16384 + 30x1024": [16384] * 2 + [1024] * 30,
            "64: 4x16384 + 60x512": [16384] * 4 + [512] * 60,
            "16: U(1, 32768)": [rng.randint(1, 32768) for _ in range(16)],
            "32: U(1, 8192)": [rng.randint(1, 8192) for _ in range(32)],
            "128: U(1, 4096)": [rng.randint(1, 4096) for _ in range(128)]}


def skewed(args, copy):
    """Graph-timed decode over batches of unequal lengths: the plan, each kernel forced."""
    from attn_ops.backends.triton import decode_kernel
    import attn_ops
    dev = device(args)
    h, hkv, d, page = (4, 2, 32, 16) if args.smoke else (H, HKV, D, 16)
    rows = []
    for name, lens in skewed_batches(args.smoke).items():
        b, ctx = len(lens), max(lens)
        k = torch.randn(b, ctx, hkv, d, device=dev, dtype=torch.bfloat16)
        k_cache, v_cache, table = paged_copy(k, torch.randn_like(k), page, dev)
        del k
        q = torch.randn(b, h, d, device=dev, dtype=torch.bfloat16)
        seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
        args_ = (q, k_cache, v_cache, seqlens, table, d ** -0.5)
        read = 2 * sum(lens) * hkv * d * 2
        for contender, fn in (
                ("attn.decode (planned)", lambda: attn_ops.decode(*args_[:5], scale=d ** -0.5,
                                                                   backend="triton")),
                ("split kernel", lambda: decode_kernel.decode(*args_, balanced=False)),
                ("balanced kernel", lambda: decode_kernel.decode(*args_, balanced=True))):
            _, graph, note = time_contender(lambda: (fn, ""), args.smoke)
            gbs = read / (graph * 1e-3) / 1e9 if graph else None
            rows.append(dict(bench="decode_skewed", batch=b, lengths=name, contender=contender,
                             graph_us=graph * 1e3 if graph else None, gbs=gbs,
                             pct_copy=100 * gbs / copy if gbs else None, note=note))
        print_table(rows[-3:], ["lengths", "contender", "graph_us", "gbs", "pct_copy"])
    write_csv(args.out / "decode_skewed.csv", rows)


PLAN_SHAPES = [(1, 2048), (1, 8192), (1, 32768), (2, 2048), (3, 8192), (5, 8192), (6, 4096),
               (10, 4096), (12, 4096), (13, 4096), (14, 2048), (15, 8192), (16, 2048)]


def plans(args, copy):
    """The decode as planned beside each row its plan chooses among, over SDPA's cache."""
    import attn_ops
    from attn_ops.backends.triton import decode_kernel, decode_plan as dp
    from attn_ops.backends.triton.common import device_sm_count
    from common import bench_ms
    dev = device(args)
    h, hkv, d = (4, 2, 32) if args.smoke else (H, HKV, D)
    shapes = [(2, 64)] if args.smoke else PLAN_SHAPES
    sms = device_sm_count(dev) if dev.type == "cuda" else 132
    rows = []
    for b, ctx in shapes:
        q = torch.randn(b, h, d, device=dev, dtype=torch.bfloat16)
        kc = torch.randn(b, hkv, ctx, d, device=dev, dtype=torch.bfloat16)  # SDPA's layout
        vc = torch.randn_like(kc)
        seqlens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        one = torch.arange(b, dtype=torch.int32, device=dev)[:, None]  # one page per sequence
        cache = (q, kc.transpose(1, 2), vc.transpose(1, 2), seqlens, one, d ** -0.5)
        programs = b * hkv
        wide, deep = max(1, sms // programs), max(1, 2 * sms // programs)
        wave = dp.num_splits(b, hkv, ctx, sms, dp.DEFAULT_CONFIG.block_n, dp.DEFAULT_RESIDENT)
        variants = {
            "planned (attn.decode)": lambda: attn_ops.decode(*cache, backend="triton"),
            f"WIDE, {wide} splits": lambda: decode_kernel.decode(
                *cache, config=dp.WIDE_CONFIG, splits=wide, balanced=False),
            f"DEEP, {deep} splits": lambda: decode_kernel.decode(
                *cache, config=dp.DEEP_CONFIG, splits=deep, balanced=False),
            f"DEFAULT, {wave} splits (wave rule)": lambda: decode_kernel.decode(
                *cache, config=dp.DEFAULT_CONFIG, splits=wave, balanced=False),
            "sdpa": lambda: F.scaled_dot_product_attention(q.view(b, h, 1, d), kc, vc,
                                                           scale=d ** -0.5, enable_gqa=True),
        }
        times = {name: [] for name in variants}
        for _ in range(1 if args.smoke else 3):
            for name, fn in variants.items():
                times[name].append(bench_ms(fn, args.smoke, graph=not args.smoke))
        sdpa = min(times["sdpa"])
        for name in variants:
            ms = min(times[name])
            gbs = kv_bytes(b, ctx, hkv, d) / (ms * 1e-3) / 1e9
            rows.append(dict(bench="decode_plans", batch=b, ctx=ctx, contender=name,
                             graph_us=ms * 1e3, vs_sdpa=sdpa / ms, gbs=gbs,
                             pct_copy=100 * gbs / copy))
        print_table([r for r in rows if (r["batch"], r["ctx"]) == (b, ctx)],
                    ["batch", "ctx", "contender", "graph_us", "vs_sdpa", "gbs", "pct_copy"])
    write_csv(args.out / "decode_plans.csv", rows)


KV_OFFSET_SHAPES = [(1, 2048), (16, 2048), (16, 8192), (64, 4096), (128, 2048)]


def kv_offsets(args, copy):
    """The decode kernels with each key's K and V offsets computed once (the default where both
    caches share block and in-page strides: common.kv_same_strides) against once per cache (the
    flag forced off, as before), interleaved in one process, graph replays; pages of 16 and
    SDPA's own contiguous cache read as one page per sequence, SDPA beside it; FP8 at B 16."""
    from attn_ops.backends import reference
    from attn_ops.backends.triton import decode_kernel
    from common import bench_ms
    dev = device(args)
    h, hkv, d = (4, 2, 32) if args.smoke else (H, HKV, D)
    shapes = [(2, 64)] if args.smoke else KV_OFFSET_SHAPES
    same = decode_kernel.kv_same_strides

    def offsets_per_cache(fn):
        def run():
            decode_kernel.kv_same_strides = lambda k, v: False
            try:
                return fn()
            finally:
                decode_kernel.kv_same_strides = same
        return run
    rows = []
    for fp8, (b, ctx) in [(False, s) for s in shapes] + [(True, shapes[min(1, len(shapes) - 1)])]:
        q = torch.randn(b, h, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(b, ctx, hkv, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        seqlens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        k_cache, v_cache, table = paged_copy(k, v, 16, dev)
        kw, elem = {}, 2
        if fp8:
            kw = dict(k_scale=torch.rand(hkv, device=dev) * 0.01 + 0.01,
                      v_scale=torch.rand(hkv, device=dev) * 0.01 + 0.01)
            k_cache = reference.quantize_fp8(k_cache, kw["k_scale"], torch.float8_e4m3fn)
            v_cache = reference.quantize_fp8(v_cache, kw["v_scale"], torch.float8_e4m3fn)
            elem = 1
        caches = {"pages of 16": (k_cache, v_cache, table)}
        variants = {}
        if not fp8:
            kd, vd = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            one = torch.arange(b, dtype=torch.int32, device=dev)[:, None]
            caches["SDPA's cache"] = (kd.transpose(1, 2), vd.transpose(1, 2), one)
            variants["sdpa"] = lambda kd=kd, vd=vd: F.scaled_dot_product_attention(
                q.view(b, h, 1, d), kd, vd, scale=d ** -0.5, enable_gqa=True)
        for name, (kc, vc, tb) in caches.items():
            call = (lambda kc=kc, vc=vc, tb=tb: decode_kernel.decode(q, kc, vc, seqlens, tb,
                                                                     d ** -0.5, **kw))
            variants[f"{name}, offsets per cache"] = offsets_per_cache(call)
            variants[f"{name}, offsets once"] = call
        times = {name: [] for name in variants}
        for _ in range(1 if args.smoke else 3):
            for name, fn in variants.items():
                times[name].append(bench_ms(fn, args.smoke, graph=not args.smoke))
        med = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
        for name, ms in med.items():
            gbs = 2 * b * ctx * hkv * d * elem / (ms * 1e-3) / 1e9
            base = med[name.replace("once", "per cache")] if "once" in name else ms
            rows.append(dict(bench="decode_kv_offsets", cache_dtype="fp8" if fp8 else "bf16",
                             batch=b, ctx=ctx, contender=name, graph_us=ms * 1e3,
                             speedup=base / ms, vs_sdpa=med["sdpa"] / ms if "sdpa" in med
                             else None, gbs=gbs, pct_copy=100 * gbs / copy))
        print_table(rows[-len(med):], ["cache_dtype", "batch", "ctx", "contender", "graph_us",
                                        "speedup", "vs_sdpa", "pct_copy"])
    write_csv(args.out / "decode_kv_offsets.csv", rows)


def tune(args, copy):
    """Sweep (BLOCK_N, warps, stages) and the split count of our kernel on target shapes, timed
    as CUDA-graph replays (device time)."""
    from attn_ops.backends.triton import decode_kernel, decode_plan
    dev = device(args)
    h, hkv, d = (4, 2, 32) if args.smoke else (H, HKV, D)
    shapes = [(2, 64, 16)] if args.smoke else [(16, 2048, 16), (1, 32768, 16), (128, 2048, 16),
                                                (64, 4096, 256)]
    configs = [(64, 4, 3), (64, 4, 2), (64, 4, 4), (32, 4, 4), (32, 2, 4), (128, 4, 2),
               (128, 8, 3), (64, 8, 3), (64, 2, 3), (16, 2, 6)]
    split_options = {16: [2, 3, 4, 6], 1: [24, 33, 50, 64], 128: [1, 2], 64: [1, 2], 2: [1, 2]}
    rows = []
    for b, ctx, page in shapes:
        q = torch.randn(b, h, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(b, ctx, hkv, d, device=dev, dtype=torch.bfloat16)
        k_cache, v_cache, table = paged_copy(k, torch.randn_like(k), page, dev)
        del k
        seqlens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        trials = [(cfg, None) for cfg in (configs[:2] if args.smoke else configs)]
        trials += [(None, sp) for sp in split_options[b]]
        for cfg, sp in trials:
            ms, err = try_time(lambda: (lambda: decode_kernel.decode(
                q, k_cache, v_cache, seqlens, table, d ** -0.5, config=cfg, splits=sp)),
                args.smoke, graph=True)
            gbs = kv_bytes(b, ctx, hkv, d) / (ms * 1e-3) / 1e9 if ms else None
            auto, cfg_auto = default_plan(b, hkv, table.shape[1] * page, d, q, cfg)
            cfg_used = decode_plan.Config(*(cfg or cfg_auto))
            rows.append(dict(batch=b, ctx=ctx, page=page, **cfg_used._asdict(),
                             splits=sp if sp is not None else f"auto={auto}",
                             graph_us=ms * 1e3 if ms else None, gbs=gbs,
                             pct_copy=100 * gbs / copy if gbs else None, error=err))
            print_table(rows[-1:], ["batch", "ctx", "page", "block_n", "warps", "stages",
                                    "splits", "graph_us", "gbs", "pct_copy", "error"])
    write_csv(args.out / "decode_tune.csv", rows)
