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

import torch
import torch.nn.functional as F

from common import copy_gbs, device, header, parse_args, print_table, time_contender, write_csv
from decode_chains import chains
from decode_common import D, H, HKV, default_plan, kv_bytes, paged_copy
from decode_growth import growth
from decode_hopper import hopper
from decode_plan_rows import kv_offsets, plans, skewed, tune

# (B, ctx): the standard shapes (docs/measuring.md), then B = 1 and 16 over context for the plot.
ANCHOR_SHAPES = [(1, 8192), (1, 32768), (16, 2048), (16, 8192), (64, 1024), (64, 4096),
                 (128, 2048), (256, 1024)]
SWEEP_SHAPES = [(b, c) for b in (1, 16) for c in (2048, 4096, 8192, 16384, 32768)]
# Batches between the split rules' rows (decode_plan.num_splits: 1.4-2.9 programs per SM at Hkv 8)
MID_SHAPES = [(24, 2048), (24, 8192), (34, 2048), (48, 2048)]
FLEX_SHAPES = {(1, 32768), (16, 2048), (64, 4096), (128, 2048)}  # each costs a compile


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
