"""Decode bandwidth: our paged split-KV Triton kernel (pages of 16 and 256, and SDPA's contiguous
cache read in place) beside SDPA, FA2 varlen and FA3's kvcache kernel (PyPI ``fa3-fwd``, when
installed) on the same K/V held contiguously, and FlexAttention, in one run.

bf16, Hq=32, Hkv=8, D=128, one query per sequence, every sequence ``ctx`` tokens long, blocks of
our paged caches shuffled. Shapes: the standard ones, B 1 and 16 over context, and batches between
the split rules' rows (B 24, 34, 48). Each contender is timed eagerly and as CUDA-graph replays
(device time, no host launch cost: how decode runs in a server); GB/s = K and V bytes read
(2 * B * ctx * Hkv * D * 2) / graph time; % is of the device copy bandwidth measured in this run
(bytes read + written).

    python benchmarks/bench_decode.py [--tune] [--growth | --growth-only] [--skewed | --skewed-only]
                                      [--kv-offsets-only] [--plans-only] [--chains-only]
                                      [--hopper-only]
                                      [--out DIR]

``--growth``: our decode side by side with its contract growth on the same cache tokens, graph
timed, rounds interleaved (median of 3): bf16, FP8 caches (float8_e4m3fn, per-head scales: half
the bytes), sinks, ``decode_with_lse``, both; targets fp8 >= 1.7x bf16 at B >= 16, ctx >= 4096,
sinks / lse <= 3% (decode_growth.csv).

``--skewed``: batches whose sequences differ in length (one or a few long among short ones, or
uniform random lengths), paged (pages of 16), graph timed: ``attn.decode`` as planned beside
the split kernel and the balanced kernel forced, GB/s over the keys actually read
(decode_skewed.csv).

``--kv-offsets-only``: each key's K and V offsets computed once (the default for caches of equal
strides) against once per cache, interleaved, over pages of 16 and SDPA's own cache with SDPA
beside (decode_kv_offsets.csv).

``--plans-only``: for few sequences (B 1-16), the decode as planned beside the rows its plan
chooses among (WIDE at one program per SM, DEEP at about two, the wave rule's DEFAULT row), each
forced on the split kernel, over SDPA's contiguous cache with SDPA beside, rounds interleaved
(decode_plans.csv): the measurement behind decode_plan.half_precision_row.

``--hopper-only``: the balanced Gluon Hopper decode (hopper_decode_kernel.py) at its grid rule
and at one and two programs per SM, beside ``attn.decode`` on the Triton backend (which routes
plain decodes to it, decode_plan.HOPPER_DECODE), the Triton kernels alone and SDPA over SDPA's
contiguous cache, B 8-48 x 1024-32768,
and three skewed batches over the same cache (one block per sequence, lengths unequal), where a
schedule that ignores lengths loses most; rounds interleaved, least of 3 (decode_hopper.csv).

``--chains-only``: decode as a captured serving step runs it, over SDPA's contiguous cache:
CHAIN calls back to back in one CUDA graph, and CHAIN steps of (store one token per sequence,
decode) in one graph, per call, with our kernels launched as programmatic dependents
(common.LAUNCH_PDL) and not, beside SDPA's (a slice copy per cache, then SDPA); rounds
interleaved, median of 3 (decode_chains.csv). A lone call per graph (the tables above) has no
kernel before it to overlap, so PDL shows only here.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from common import (copy_gbs, device, header, parse_args, print_table, time_contender, try_time,
                    write_csv)

H, HKV, D = 32, 8, 128
# (B, ctx): the standard shapes (docs/measuring.md), then B = 1 and 16 over context for the plot.
ANCHOR_SHAPES = [(1, 8192), (1, 32768), (16, 2048), (16, 8192), (64, 1024), (64, 4096),
                 (128, 2048), (256, 1024)]
SWEEP_SHAPES = [(b, c) for b in (1, 16) for c in (2048, 4096, 8192, 16384, 32768)]
# Batches between the split rules' rows (decode_plan.num_splits: 1.4-2.9 programs per SM at Hkv 8)
MID_SHAPES = [(24, 2048), (24, 8192), (34, 2048), (48, 2048)]
FLEX_SHAPES = {(1, 32768), (16, 2048), (64, 4096), (128, 2048)}  # each costs a compile


def kv_bytes(b, ctx, hkv=HKV, d=D) -> int:
    return 2 * b * ctx * hkv * d * 2


def default_plan(b, hkv, capacity, d, q, cfg=None):
    """(splits, Config) the half-precision decode picks without overrides (``cfg``: a fixed
    config, then only the split rules apply), as decode_kernel._plan does."""
    from attn_ops.backends.triton import decode_plan as dp
    from attn_ops.backends.triton.common import device_sm_count
    sms = device_sm_count(q.device)
    deep = cfg is None and dp.half_precision_row(b * hkv, sms, capacity)
    if deep:
        return deep
    config = dp.Config(*(cfg or dp.launch_config(d, q.dtype)))
    resident = dp.DEFAULT_RESIDENT if config == dp.DEFAULT_CONFIG else 0
    return dp.num_splits(b, hkv, capacity, sms, config.block_n, resident), config


def paged_copy(k, v, page, gen_device):
    """[B, ctx, Hkv, D] K/V -> shuffled paged caches [blocks, page, Hkv, D] and a block table
    [B, ctx/page]."""
    b, ctx, hkv, d = k.shape
    per_seq = -(-ctx // page)
    num_blocks = b * per_seq
    perm = torch.randperm(num_blocks, device=gen_device)
    table = perm.view(b, per_seq).to(torch.int32)
    k_cache = torch.empty(num_blocks, page, hkv, d, dtype=k.dtype, device=k.device)
    v_cache = torch.empty_like(k_cache)
    pad = per_seq * page - ctx
    kp = F.pad(k, (0, 0, 0, 0, 0, pad)).view(b * per_seq, page, hkv, d)
    vp = F.pad(v, (0, 0, 0, 0, 0, pad)).view(b * per_seq, page, hkv, d)
    k_cache[perm] = kp
    v_cache[perm] = vp
    return k_cache, v_cache, table


def contenders(q, k, v, b, ctx, dev, pages):
    """name -> factory returning (callable, note). k/v ``[B, ctx, Hkv, D]`` contiguous."""
    import attn_ops
    from attn_ops.backends.triton import decode_kernel
    h, d = q.shape[1], q.shape[2]
    hkv = k.shape[2]
    scale = d ** -0.5
    seqlens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
    out = {}
    for page in pages:
        def ours(page=page):
            k_cache, v_cache, table = paged_copy(k, v, page, dev)
            splits, _ = default_plan(b, hkv, table.shape[1] * page, d, q)
            run = lambda: attn_ops.decode(q, k_cache, v_cache, seqlens, table, scale,  # noqa
                                          backend="triton")
            return run, f"paged, {splits} splits"
        out[f"triton p{page} (ours)"] = ours

    qd = q.view(b, h, 1, d)
    kd, vd = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, ctx, D] views (strided)

    def ours_contiguous():
        # SDPA's own heads-major cache, read as one page of ctx tokens per sequence (the
        # contract's strided caches): the same bytes in the same order as SDPA reads them
        kc, vc = kd.contiguous(), vd.contiguous()
        one = torch.arange(b, dtype=torch.int32, device=dev)[:, None]
        run = lambda: attn_ops.decode(q, kc.transpose(1, 2), vc.transpose(1, 2),  # noqa: E731
                                      seqlens, one, scale, backend="triton")
        return run, "SDPA's contiguous [B, Hkv, ctx, D] cache as one page per sequence"
    out["triton contiguous (ours)"] = ours_contiguous

    def sdpa():
        kc, vc = kd.contiguous(), vd.contiguous()
        run = lambda: F.scaled_dot_product_attention(qd, kc, vc, scale=scale,  # noqa: E731
                                                     enable_gqa=True)
        run()
        return run, "contiguous KV, default dispatch, enable_gqa"

    def fa2_varlen():
        op = torch.ops.aten._flash_attention_forward
        cu_q = torch.arange(b + 1, device=dev, dtype=torch.int32)
        cu_k = cu_q * ctx
        kf, vf = k.view(b * ctx, hkv, d), v.view(b * ctx, hkv, d)
        run = lambda: op(q, kf, vf, cu_q, cu_k, 1, ctx, 0.0, False, False, scale=scale)  # noqa
        run()
        return run, "contiguous KV, aten._flash_attention_forward"

    def flex():
        from torch.nn.attention.flex_attention import flex_attention
        kc, vc = kd.contiguous(), vd.contiguous()
        fn = torch.compile(flex_attention, dynamic=False)
        run = lambda: fn(qd, kc, vc, scale=scale, enable_gqa=True)  # noqa: E731
        run()
        return run, "contiguous KV, compiled"

    def fa3_kvcache():
        import fa3_fwd_interface as fa3  # PyPI fa3-fwd: forward-only FA3, bf16
        seqlens_c = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        run = lambda: fa3.flash_attn_with_kvcache(q.view(b, 1, h, d), k, v,  # noqa: E731
                                                  cache_seqlens=seqlens_c, softmax_scale=scale)
        run()
        return run, "contiguous KV, fa3-fwd kvcache, its own split heuristic"

    out.update(sdpa=sdpa, fa2_varlen=fa2_varlen, fa3_kvcache=fa3_kvcache)
    if (b, ctx) in FLEX_SHAPES:
        out["flex"] = flex
    return out


def run_shape(b, ctx, args, copy, pages=(16, 256)):
    """One row per contender: eager time (host launch cost included) and CUDA-graph replay time
    (device only); bandwidth and ratios use the graph time, the serving setting for decode."""
    dev = device(args)
    h, hkv, d = (4, 2, 32) if args.smoke else (H, HKV, D)
    q = torch.randn(b, h, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, ctx, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    rows = []
    for name, factory in contenders(q, k, v, b, ctx, dev, pages).items():
        eager, graph, note = time_contender(factory, args.smoke)
        best = graph or eager
        gbs = kv_bytes(b, ctx, hkv, d) / (best * 1e-3) / 1e9 if best else None
        rows.append(dict(bench="decode", batch=b, ctx=ctx, heads=h, kv_heads=hkv, head_dim=d,
                         contender=name, eager_us=eager * 1e3 if eager else None,
                         graph_us=graph * 1e3 if graph else None,
                         eager_gbs=kv_bytes(b, ctx, hkv, d) / (eager * 1e-3) / 1e9
                         if eager else None,
                         gbs=gbs, pct_copy=100 * gbs / copy if gbs else None,
                         timing="graph" if graph else "eager", note=note))
    sdpa = next((r["gbs"] for r in rows if r["contender"] == "sdpa"), None)
    for r in rows:
        r["vs_sdpa"] = r["gbs"] / sdpa if sdpa and r["gbs"] else None
    return rows


GROWTH_SHAPES = [(16, 4096), (16, 8192), (32, 8192), (64, 4096), (128, 4096), (8, 4096),
                 (16, 2048), (24, 4096), (32, 4096), (48, 4096)]


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
    for fp8, (b, ctx) in [(False, s) for s in shapes] + [(True, shapes[1])]:
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


def main():
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--growth", action="store_true", help="also fp8 / sinks / lse vs bf16"),
        p.add_argument("--growth-only", action="store_true", help="only the --growth table"),
        p.add_argument("--skewed", action="store_true", help="also batches of unequal lengths"),
        p.add_argument("--skewed-only", action="store_true", help="only the --skewed table"),
        p.add_argument("--kv-offsets-only", action="store_true",
                       help="only K/V offsets once vs once per cache"),
        p.add_argument("--plans-only", action="store_true",
                       help="only the few-sequence plan rows beside the planned decode"),
        p.add_argument("--chains-only", action="store_true",
                       help="only decode and store + decode steps captured back to back"),
        p.add_argument("--hopper-only", action="store_true",
                       help="only the Gluon Hopper decode beside the Triton plan and SDPA")))
    env = header("decode", args.smoke)
    copy = copy_gbs(args.smoke)
    print(f"ceiling: device copy {copy:.0f} GB/s (read + write)")
    if args.tune or args.tune_only:
        tune(args, copy)
    if args.growth or args.growth_only:
        growth(args, copy)
    if args.skewed or args.skewed_only:
        skewed(args, copy)
    if args.kv_offsets_only:
        kv_offsets(args, copy)
    if args.plans_only:
        plans(args, copy)
    if args.chains_only:
        chains(args, copy)
    if args.hopper_only:
        hopper(args, copy)
    if (args.tune_only or args.growth_only or args.skewed_only or args.kv_offsets_only
            or args.plans_only or args.chains_only or args.hopper_only):
        return
    shapes = [(2, 64), (1, 200)] if args.smoke else list(dict.fromkeys(ANCHOR_SHAPES +
                                                                        SWEEP_SHAPES + MID_SHAPES))
    rows = []
    for b, ctx in shapes:
        rows += run_shape(b, ctx, args, copy, pages=(16, 32) if args.smoke else (16, 256))
        print_table([r for r in rows if (r["batch"], r["ctx"]) == (b, ctx)],
                    ["batch", "ctx", "contender", "eager_us", "graph_us", "gbs", "pct_copy"])
    for r in rows:
        r.update(copy_gbs=copy, device=env["device"], date=env["date"], torch=env["torch"],
                 triton=env["triton"])
    write_csv(args.out / "decode.csv", rows)
    print_table(rows, ["batch", "ctx", "contender", "eager_us", "graph_us", "gbs", "pct_copy",
                       "vs_sdpa", "note"])


if __name__ == "__main__":
    main()
