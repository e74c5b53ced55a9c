"""The unified paged kernel beside our older kernels, FA3 (``fa3-fwd``), SDPA and the ceilings,
in one run: few queries per sequence over a paged cache, a mixed batch, short prompts, decode.

bf16, H=32, Hkv=8, D=128, pages of 16 with shuffled blocks. Sections (``--only`` picks some):

* ``few``: B in {16, 64} sequences of 1/2/4/8/16 queries over ctx 2048/8192 cached tokens,
  through ``attn.prefill`` with a block table (its route: the unified kernel to 16 rows per
  sequence, past them on sm90 the Gluon kernel's packed form), beside the unified kernel and
  the packed form called directly. The floor is the one-token decode on the same cache (the
  same K/V bytes); the target is <= 1.15x its time. CUDA-graph replays.
* ``mixed``: 48 decode rows + 8 sequences of 4 speculative rows (ctx 4096) + 2 chunks of 512
  over 4096-token prefixes, in one call, against the sum of its parts' roofline times
  (max(bytes / copy, FLOPs / matmul) per part) and against its parts timed alone. Graph replays.
* ``short``: dense causal prompts 64 x 256, 96 x U(1, 400), 16 x 1024 and 4 x 4096 in TFLOP/s
  (eager ``do_bench``, as ANCHORS.md), against FA3 varlen / dense and SDPA cuDNN / flash.
* ``skewed``: 1, 2 and 4 queries per sequence over keys of unequal lengths (bench_decode's
  skewed batches), through ``attn.prefill`` as planned beside the unified kernel and the
  balanced kernel forced, and the one-token decode over the same lengths; graph replays, in %
  of the copy bandwidth (the K/V bytes read once).
* ``decode``: one-token decode, our split-KV kernel and the unified kernel (pages of 16) against
  SDPA and FA3's kvcache kernel on contiguous K/V, in GB/s of K+V read; graph replays; plus a
  per-kernel profile of the split and merge launches at small B.

    python benchmarks/bench_unified.py [--only few,mixed,short,decode,skewed] [--variants]
        [--out DIR]
    python benchmarks/bench_unified.py --plot benchmarks/results/unified.csv  # unified.png
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from common import (bench_ms, copy_gbs, device, header, matmul_tflops, parse_args, print_table,
                    write_csv)

H, HKV, D = 32, 8, 128
PAGE = 16


def _fa3():
    try:
        import fa3_fwd_interface as fa3
        return fa3
    except Exception:  # not installed here
        return None


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _time(fn, args, graph=True):
    """ms of ``fn`` (graph replays, or eager do_bench), or None and the reason."""
    try:
        fn()
        return bench_ms(fn, args.smoke, graph=graph and not args.smoke), ""
    except Exception as e:  # a contender that cannot run here is reported, not fatal
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:160]


def _hopper_packed(dev):
    """The Gluon Hopper prefill's launch module where it runs here (sm90), else None."""
    from attn_ops.backends.triton import hopper_prefill_launch
    return hopper_prefill_launch if hopper_prefill_launch.available(dev) else None


def _paged(lens_k, dev, hkv=HKV, d=D, page=PAGE):
    """Caches holding ``lens_k[b]`` tokens of each sequence in shuffled pages, and the table."""
    need = [-(-n // page) for n in lens_k]
    width = max(need)
    total = sum(need)
    perm = torch.randperm(total, device=dev).to(torch.int32)
    table = torch.zeros(len(lens_k), width, dtype=torch.int32, device=dev)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[at:at + n]
        at += n
    k_cache = torch.randn(total, page, hkv, d, dtype=torch.bfloat16, device=dev)
    return k_cache, torch.randn_like(k_cache), table


def _cu(lens, dev):
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lens).cumsum(0)
    return out.to(dev)


def _kv_bytes(lens_k, hkv=HKV, d=D):
    return 2 * sum(lens_k) * hkv * d * 2


def _causal_flops(lens_q, lens_k, h=H, d=D):
    # query i of a sequence sees lk - lq + i + 1 keys (bottom-right causal)
    return sum(4 * h * d * (lq * (lk - lq) + lq * (lq + 1) / 2) for lq, lk in zip(lens_q, lens_k))


def few_queries(args, copy):
    import attn_ops
    from attn_ops.backends.triton import decode_kernel, prefill_kernel, unified_kernel, unified_plan
    dev = device(args)
    fa3 = _fa3()
    h, hkv, d = (4, 2, 32) if args.smoke else (H, HKV, D)
    shapes = [(2, 2, 64)] if args.smoke else [(b, nq, ctx) for b in (16, 64) for ctx in
                                              (2048, 8192) for nq in (1, 2, 4, 8, 16)]
    rows = []
    for b, nq, ctx in shapes:
        lens_k = [ctx] * b
        k_cache, v_cache, table = _paged(lens_k, dev, hkv, d)
        q = torch.randn(b * nq, h, d, dtype=torch.bfloat16, device=dev)
        q1 = torch.randn(b, h, d, dtype=torch.bfloat16, device=dev)
        cu_q, cu_k = _cu([nq] * b, dev), _cu(lens_k, dev)
        seqlens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        sc = d ** -0.5
        three_loops = unified_plan.launch_config(nq * h // hkv, d, q.dtype)._replace(
            one_loop=False)
        runs = {
            "decode 1 token (split-KV kernel)": lambda: decode_kernel.decode(
                q1, k_cache, v_cache, seqlens, table, sc),
            "attn.prefill, triton backend": lambda: attn_ops.prefill(
                q, k_cache, v_cache, cu_q, cu_k, nq, ctx, sc, True, table, backend="triton"),
            "unified decode 1 token": lambda: unified_kernel.decode(
                q1, k_cache, v_cache, seqlens, table, sc),
            "unified prefill": lambda: unified_kernel.prefill(
                q, k_cache, v_cache, cu_q, cu_k, nq, ctx, sc, True, table),
        }
        hopper = _hopper_packed(dev)
        if hopper is not None and not args.smoke:  # the packed form, whatever the route's rule
            from attn_ops.backends.triton.hopper_prefill_forms import pack_of
            pack = pack_of(h, hkv)
            runs["Gluon packed form (guarded)"] = lambda: hopper.prefill_guarded(
                q, k_cache, v_cache, cu_q, cu_k, nq, ctx, sc, True, table, pack=pack)
        if args.variants:
            runs.update({
                "decode 1 token (split-KV kernel, merge launch)": lambda: decode_kernel.decode(
                    q1, k_cache, v_cache, seqlens, table, sc, fused=False),
                "unified prefill, three loops": lambda: unified_kernel.prefill(
                    q, k_cache, v_cache, cu_q, cu_k, nq, ctx, sc, True, table,
                    config=three_loops)})
            if nq == 8:  # the 32-row tiles against the 64-row (wgmma) ones (unified_plan)
                for tile, block_n, stages, splits in ((32, 128, 3, 1), (32, 128, 5, 1),
                                                      (64, 64, 5, 1), (64, 64, 5, 2)):
                    cfg = unified_plan.Config(tile, 0, block_n, 4, stages)
                    runs[f"unified prefill, {tile} rows, {block_n}/{stages}, {splits} split"] = (
                        lambda cfg=cfg, splits=splits: unified_kernel.prefill(
                            q, k_cache, v_cache, cu_q, cu_k, nq, ctx, sc, True, table,
                            config=cfg, splits=splits))
        if nq == 4 and ctx == 2048 and b == 64:
            runs["old prefill kernel"] = lambda: prefill_kernel.prefill(
                q, k_cache, v_cache, cu_q, cu_k, nq, ctx, sc, True, table)
        base = None
        for name, fn in runs.items():
            ms, err = _time(fn, args)
            if name.startswith("decode 1 token"):
                base = ms
            gbs = _kv_bytes(lens_k, hkv, d) / (ms * 1e-3) / 1e9 if ms else None
            rows.append(dict(section="few", batch=b, queries=nq, ctx=ctx, contender=name,
                             us=ms * 1e3 if ms else None, gbs=gbs,
                             pct_copy=100 * gbs / copy if gbs else None,
                             vs_decode=ms / base if ms and base else None, note=err))
        print_table([r for r in rows if (r["batch"], r["queries"], r["ctx"]) == (b, nq, ctx)],
                    ["batch", "queries", "ctx", "contender", "us", "gbs", "vs_decode", "note"])
        del k_cache, v_cache
    return rows


def skewed(args, copy):
    """Few queries per sequence over keys of unequal lengths: the plan and each kernel forced."""
    import attn_ops
    from attn_ops.backends.triton import decode_kernel, unified_kernel
    from bench_decode import skewed_batches
    dev = device(args)
    h, hkv, d = (4, 2, 32) if args.smoke else (H, HKV, D)
    rows = []
    batches = dict(skewed_batches(args.smoke))
    if not args.smoke:  # the uniform cost
        batches.update({"16: 16x2048": [2048] * 16, "32: 32x4096": [4096] * 32})
    for name, lens_k in batches.items():
        k_cache, v_cache, table = _paged(lens_k, dev, hkv, d)
        seqlens = torch.tensor(lens_k, dtype=torch.int32, device=dev)
        q1 = torch.randn(len(lens_k), h, d, dtype=torch.bfloat16, device=dev)
        sc = d ** -0.5
        for nq in (1, 2, 4):
            lens_q = [min(nq, n) for n in lens_k]
            q = torch.randn(sum(lens_q), h, d, dtype=torch.bfloat16, device=dev)
            cu_q, cu_k = _cu(lens_q, dev), _cu(lens_k, dev)
            common = (q, k_cache, v_cache, cu_q, cu_k, nq, max(lens_k), sc, True, table)
            runs = {"decode 1 token (planned)": lambda: decode_kernel.decode(
                        q1, k_cache, v_cache, seqlens, table, sc),
                    "attn.prefill, triton backend": lambda: attn_ops.prefill(
                        *common, backend="triton"),
                    "unified kernel": lambda: unified_kernel.prefill(*common, balanced=False),
                    "balanced kernel": lambda: unified_kernel.prefill(*common, balanced=True)}
            base = None
            for contender, fn in runs.items():
                ms, err = _time(fn, args)
                base = ms if contender.startswith("decode") else base
                gbs = _kv_bytes(lens_k, hkv, d) / (ms * 1e-3) / 1e9 if ms else None
                rows.append(dict(section="skewed", batch=len(lens_k), lengths=name, queries=nq,
                                 contender=contender, us=ms * 1e3 if ms else None, gbs=gbs,
                                 pct_copy=100 * gbs / copy if gbs else None,
                                 vs_decode=ms / base if ms and base else None, note=err))
            print_table(rows[-len(runs):], ["lengths", "queries", "contender", "us", "pct_copy",
                                            "vs_decode", "note"])
        del k_cache, v_cache
    return rows


def mixed(args, copy, mm):
    import attn_ops
    from attn_ops.backends.triton import decode_kernel, prefill_kernel, unified_kernel
    dev = device(args)
    h, hkv, d = (4, 2, 32) if args.smoke else (H, HKV, D)
    ctx, chunk = (64, 16) if args.smoke else (4096, 512)
    n_dec, n_spec = (3, 2) if args.smoke else (48, 8)
    parts = {"decode rows": ([1] * n_dec, [ctx] * n_dec),
             "speculative rows": ([4] * n_spec, [ctx] * n_spec),
             "chunks": ([chunk] * 2, [ctx + chunk] * 2)}
    lens_q = sum((p[0] for p in parts.values()), [])
    lens_k = sum((p[1] for p in parts.values()), [])
    k_cache, v_cache, table = _paged(lens_k, dev, hkv, d)
    q = torch.randn(sum(lens_q), h, d, dtype=torch.bfloat16, device=dev)
    sc = d ** -0.5
    rows = []

    def add(name, fn, lq, lk, roof_us=None):
        ms, err = _time(fn, args)
        rows.append(dict(section="mixed", contender=name, tokens_q=sum(lq), seqs=len(lq),
                         us=ms * 1e3 if ms else None, roofline_us=roof_us,
                         vs_roofline=ms * 1e3 / roof_us if ms and roof_us else None, note=err))
        return ms

    roof_total = 0.0
    at = 0
    part_ms = {}
    for name, (lq, lk) in parts.items():
        n = len(lq)
        tb = table[at:at + n]
        qs = q[sum(lens_q[:at]):sum(lens_q[:at + n])]
        roof = max(_kv_bytes(lk, hkv, d) / copy / 1e3, _causal_flops(lq, lk, h, d) / mm / 1e6)
        roof_total += roof
        cq, ck = _cu(lq, dev), _cu(lk, dev)
        part_ms[name] = add(f"part: {name} (unified)", lambda qs=qs, cq=cq, ck=ck, tb=tb, lq=lq,
                            lk=lk: unified_kernel.prefill(qs, k_cache, v_cache, cq, ck, max(lq),
                                                          max(lk), sc, True, tb), lq, lk, roof)
        if name == "decode rows":
            seq = torch.tensor(lk, dtype=torch.int32, device=dev)
            q1 = qs.contiguous()
            add("part: decode rows (split-KV decode kernel)", lambda q1=q1, seq=seq, tb=tb:
                decode_kernel.decode(q1, k_cache, v_cache, seq, tb, sc), lq, lk, roof)
        if name == "chunks":
            add("part: chunks (old prefill kernel)", lambda qs=qs, cq=cq, ck=ck, tb=tb, lq=lq,
                lk=lk: prefill_kernel.prefill(qs, k_cache, v_cache, cq, ck, max(lq), max(lk), sc,
                                              True, tb), lq, lk, roof)
            from attn_ops.backends.triton import hopper_prefill_launch as hopper
            if hopper.available(dev):
                hop = hopper.bind_prefill_guarded(qs, k_cache, v_cache, cq, ck, max(lq), max(lk),
                                                  sc, True, tb)
                add("part: chunks (hopper kernel, paged, guarded)", lambda hop=hop, qs=qs,
                    cq=cq, ck=ck, tb=tb, lq=lq, lk=lk: hop(qs, k_cache, v_cache, cq, ck, max(lq),
                                                           max(lk), sc, True, tb), lq, lk, roof)
        at += n
    cu_q, cu_k = _cu(lens_q, dev), _cu(lens_k, dev)
    whole = add("mixed batch, one call (attn.prefill, triton backend)", lambda: attn_ops.prefill(
        q, k_cache, v_cache, cu_q, cu_k, max(lens_q), max(lens_k), sc, True, table,
        backend="triton"), lens_q, lens_k, roof_total)
    for sp in (2, 4, 8) if args.variants else ():
        add(f"mixed batch, one call (unified, {sp} splits)", lambda sp=sp: unified_kernel.prefill(
            q, k_cache, v_cache, cu_q, cu_k, max(lens_q), max(lens_k), sc, True, table,
            splits=sp), lens_q, lens_k, roof_total)
    for cfg, sp in (((16, 128, 128, 8, 3), 4), ((16, 64, 64, 4, 3), 1), ((16, 64, 64, 4, 3), 2),
                    ((16, 64, 64, 4, 3), 4), ((32, 64, 64, 4, 3), 4)) if args.variants else ():
        add(f"mixed batch, one call (unified {cfg}, {sp} splits)", lambda cfg=cfg, sp=sp:
            unified_kernel.prefill(q, k_cache, v_cache, cu_q, cu_k, max(lens_q), max(lens_k), sc,
                                   True, table, config=cfg, splits=sp), lens_q, lens_k,
            roof_total)
    add("mixed batch, one call (old prefill kernel)", lambda: prefill_kernel.prefill(
        q, k_cache, v_cache, cu_q, cu_k, max(lens_q), max(lens_k), sc, True, table), lens_q,
        lens_k, roof_total)
    parts_sum = sum(v for v in part_ms.values() if v)
    rows.append(dict(section="mixed", contender="sum of the unified parts", us=parts_sum * 1e3,
                     roofline_us=roof_total, vs_roofline=parts_sum * 1e3 / roof_total,
                     note=f"one call / parts = {whole / parts_sum:.3f}" if whole else ""))
    print_table(rows, ["contender", "tokens_q", "seqs", "us", "roofline_us", "vs_roofline",
                       "note"])
    return rows


def short_prompts(args, mm):
    import attn_ops
    from attn_ops.backends.triton import prefill_kernel, unified_kernel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev = device(args)
    fa3 = _fa3()
    h, hkv, d = (4, 2, 32) if args.smoke else (H, HKV, D)
    gen = torch.Generator().manual_seed(0)
    cases = [("2 x 32", [32] * 2)] if args.smoke else [
        ("64 x 256", [256] * 64), ("96 x U(1,400)", torch.randint(1, 401, (96,),
                                                                   generator=gen).tolist()),
        ("16 x 1024", [1024] * 16), ("4 x 4096", [4096] * 4)]
    configs = [None, (16, 128, 64, 8, 3)] if args.variants else [None]
    rows = []
    for label, lens in cases:
        total, mx = sum(lens), max(lens)
        q = torch.randn(total, h, d, dtype=torch.bfloat16, device=dev)
        k = torch.randn(total, hkv, d, dtype=torch.bfloat16, device=dev)
        v = torch.randn_like(k)
        cu = _cu(lens, dev)
        sc = d ** -0.5
        flops = _causal_flops(lens, lens, h, d)
        runs = {"FA2-style prefill kernel": lambda: prefill_kernel.prefill(q, k, v, cu, cu, mx,
                                                                            mx, sc, True),
                "attn.prefill, triton backend": lambda: attn_ops.prefill(
                    q, k, v, cu, cu, mx, mx, sc, True, backend="triton")}
        from attn_ops.backends.triton import hopper_prefill_launch as hopper
        if hopper.available(dev):  # the Gluon kernel without, then with its guard (flags + fixup)
            runs["hopper kernel, unguarded"] = lambda: hopper.prefill(q, k, v, cu, cu, mx, mx, sc,
                                                                      True)
            guarded = hopper.bind_prefill_guarded(q, k, v, cu, cu, mx, mx, sc, True)
            runs["hopper kernel, guarded (bound)"] = lambda: guarded(q, k, v, cu, cu, mx, mx, sc,
                                                                     True)
        for cfg in configs:
            if cfg is not None and mx >= 4096:
                continue
            runs[f"unified {cfg or 'default'}"] = lambda cfg=cfg: unified_kernel.prefill(
                q, k, v, cu, cu, mx, mx, sc, True, config=cfg)
        if fa3 is not None:
            runs["fa3 varlen"] = lambda: _first(fa3.flash_attn_varlen_func(
                q, k, v, cu, cu, mx, mx, softmax_scale=sc, causal=True))
        if len(set(lens)) == 1:
            b = len(lens)
            qd, kd, vd = (x.view(b, mx, -1, d) for x in (q, k, v))
            if fa3 is not None:
                runs["fa3 dense"] = lambda: _first(fa3.flash_attn_func(qd, kd, vd,
                                                                       softmax_scale=sc,
                                                                       causal=True))
            qt, kt, vt = (x.transpose(1, 2) for x in (qd, kd, vd))
            for be, nm in ((SDPBackend.CUDNN_ATTENTION, "sdpa cudnn"),
                           (SDPBackend.FLASH_ATTENTION, "sdpa flash")):
                def run(be=be):
                    with sdpa_kernel([be]):
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True,
                                                              scale=sc, enable_gqa=True)
                runs[nm] = run
        fa3_tf = None
        for name, fn in runs.items():
            ms, err = _time(fn, args, graph=False)
            tf = flops / (ms * 1e-3) / 1e12 if ms else None
            if name == "fa3 varlen":
                fa3_tf = tf
            rows.append(dict(section="short", shape=label, contender=name,
                             ms=ms, tflops=tf, pct_matmul=100 * tf / mm if tf else None,
                             note=err))
        for r in rows:
            if r["shape"] == label:
                r["vs_fa3_varlen"] = r["tflops"] / fa3_tf if r["tflops"] and fa3_tf else None
        print_table([r for r in rows if r["shape"] == label],
                    ["shape", "contender", "ms", "tflops", "vs_fa3_varlen", "note"])
        del q, k, v
    return rows


def decode(args, copy):
    from attn_ops.backends.triton import decode_kernel, unified_kernel
    dev = device(args)
    fa3 = _fa3()
    h, hkv, d = (4, 2, 32) if args.smoke else (H, HKV, D)
    shapes = [(2, 64)] if args.smoke else [(1, 8192), (1, 32768), (16, 2048), (16, 8192),
                                            (64, 4096), (128, 2048), (256, 1024)]
    rows = []
    for b, ctx in shapes:
        lens = [ctx] * b
        k_cache, v_cache, table = _paged(lens, dev, hkv, d)
        q = torch.randn(b, h, d, dtype=torch.bfloat16, device=dev)
        seqlens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        sc = d ** -0.5
        kc = torch.randn(b, ctx, hkv, d, dtype=torch.bfloat16, device=dev)
        vc = torch.randn_like(kc)
        kt, vt = kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()
        runs = {
            "split-KV decode kernel p16": lambda: decode_kernel.decode(q, k_cache, v_cache,
                                                                       seqlens, table, sc),
            "split-KV decode kernel p16, merge launch": lambda: decode_kernel.decode(
                q, k_cache, v_cache, seqlens, table, sc, fused=False),
            "unified decode p16": lambda: unified_kernel.decode(q, k_cache, v_cache, seqlens,
                                                                table, sc),
            "sdpa (contiguous)": lambda: F.scaled_dot_product_attention(
                q.view(b, h, 1, d), kt, vt, scale=sc, enable_gqa=True),
        }
        if b <= 16 and args.variants:
            for s in ((2, 8, 16) if b == 16 else (32, 64)):
                runs[f"split-KV decode kernel p16, {s} splits"] = (
                    lambda s=s: decode_kernel.decode(q, k_cache, v_cache, seqlens, table, sc,
                                                     splits=s))
        if fa3 is not None:
            runs["fa3 kvcache (contiguous)"] = lambda: fa3.flash_attn_with_kvcache(
                q.view(b, 1, h, d), kc, vc, cache_seqlens=seqlens, softmax_scale=sc)
        sdpa = None
        for name, fn in runs.items():
            ms, err = _time(fn, args)
            gbs = _kv_bytes(lens, hkv, d) / (ms * 1e-3) / 1e9 if ms else None
            if name.startswith("sdpa"):
                sdpa = gbs
            rows.append(dict(section="decode", batch=b, ctx=ctx, contender=name,
                             us=ms * 1e3 if ms else None, gbs=gbs,
                             pct_copy=100 * gbs / copy if gbs else None, note=err))
        for r in rows:
            if (r["batch"], r["ctx"]) == (b, ctx):
                r["vs_sdpa"] = r["gbs"] / sdpa if r["gbs"] and sdpa else None
        print_table([r for r in rows if (r["batch"], r["ctx"]) == (b, ctx)],
                    ["batch", "ctx", "contender", "us", "gbs", "pct_copy", "vs_sdpa", "note"])
        if b in (1, 16) and ctx in (2048, 32768) and not args.smoke and args.variants:
            for fused in (True, False):
                rows += _kernel_profile(lambda fused=fused: decode_kernel.decode(
                    q, k_cache, v_cache, seqlens, table, sc, fused=fused), b, ctx)
        del k_cache, v_cache, kc, vc, kt, vt
    return rows


def probe(args, copy):
    """Variants that locate the few-query gap at one split (B = 64) and at 8 queries, and the
    mixed batch's large-tile config and split count."""
    from attn_ops.backends.triton import decode_kernel, unified_kernel, unified_plan
    dev = device(args)
    h, hkv, d = (4, 2, 32) if args.smoke else (H, HKV, D)
    sc = d ** -0.5
    rows = []
    for b, nq, ctx in ([(2, 2, 64)] if args.smoke else [(64, 1, 2048), (64, 4, 2048),
                                                        (16, 8, 2048)]):
        lens_k = [ctx] * b
        k_cache, v_cache, table = _paged(lens_k, dev, hkv, d)
        q = torch.randn(b * nq, h, d, dtype=torch.bfloat16, device=dev)
        cu_q, cu_k = _cu([nq] * b, dev), _cu(lens_k, dev)
        seqlens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        runs = {"decode 1 token": lambda: decode_kernel.decode(q[:b], k_cache, v_cache, seqlens,
                                                                table, sc)}
        cfg = unified_plan.launch_config(nq * h // hkv, d, q.dtype)
        variants = [("default", {}), ("non-causal", dict(causal=False)),
                    ("2 splits", dict(splits=2)), ("4 splits", dict(splits=4)),
                    ("block_n 32", dict(config=cfg._replace(block_n=32))),
                    ("8 warps", dict(config=cfg._replace(warps=8))),
                    ("2 stages", dict(config=cfg._replace(stages=2)))]
        for name, kw in variants:
            kw = dict(kw)
            causal = kw.pop("causal", True)
            runs[f"unified prefill, {name}"] = lambda kw=kw, causal=causal: unified_kernel.prefill(
                q, k_cache, v_cache, cu_q, cu_k, nq, ctx, sc, causal, table, **kw)
        base = None
        for name, fn in runs.items():
            ms, err = _time(fn, args)
            base = base or ms
            rows.append(dict(section="probe", batch=b, queries=nq, ctx=ctx, contender=name,
                             us=ms * 1e3 if ms else None,
                             vs_decode=ms / base if ms and base else None, note=err))
        print_table(rows[-len(runs):], ["batch", "queries", "ctx", "contender", "us",
                                        "vs_decode", "note"])
        del k_cache, v_cache
    return rows


def _kernel_profile(fn, b, ctx):
    """Per-kernel device time of graph replays (stage 1 vs merge) from the torch profiler."""
    from common import captured
    replay = captured(fn)
    for _ in range(20):
        replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(50):
            replay()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.count:
            us = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)
            rows.append(dict(section="decode_profile", batch=b, ctx=ctx, contender=e.key[:60],
                             us=us, note=f"{e.count} launches, mean device us per launch"))
    print_table(rows, ["batch", "ctx", "contender", "us", "note"])
    return rows


def plot(csv_path, png_path):
    """From unified.csv: few-query prefill time over the one-token decode on the same cache
    (target 1.15; attn.prefill's route beside the unified kernel and the Gluon packed form
    where the run has them), and, where the run has the decode section, one-token decode GB/s
    against SDPA and FA3 (as % of copy)."""
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(csv.DictReader(open(csv_path)))
    dec = [r for r in rows if r["section"] == "decode"]
    fig, axes = plt.subplots(1, 2 if dec else 1, figsize=(14 if dec else 10, 4.8), squeeze=False)
    a = axes[0][0]
    few = [r for r in rows if r["section"] == "few"]
    shapes = list(dict.fromkeys((r["batch"], r["queries"], r["ctx"]) for r in few))
    series = [(c, label) for c, label in (
        ("attn.prefill, triton backend", "attn.prefill (its route)"),
        ("unified prefill", "unified kernel"),
        ("Gluon packed form (guarded)", "Gluon packed form (guarded)"))
        if any(r["contender"] == c and r["vs_decode"] for r in few)]
    width = 0.8 / max(len(series), 1)
    for i, (key, label) in enumerate(series):
        vals = [next((float(r["vs_decode"]) for r in few if (r["batch"], r["queries"], r["ctx"])
                      == sh and r["contender"] == key and r["vs_decode"]), 0.0) for sh in shapes]
        a.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(shapes))], vals, width,
              label=label)
    a.axhline(1.15, color="tab:red", ls="--", label="target 1.15x")
    a.set_xticks(range(len(shapes)), [f"B{b} q{q} ctx {c}" for b, q, c in shapes], fontsize=7,
                 rotation=60)
    a.set_ylabel("time / one-token decode, same cache")
    a.set_title("few queries per sequence, paged (pages of 16)")
    a.legend(fontsize=8, loc="lower right")
    if dec:
        b = axes[0][1]
        shapes = list(dict.fromkeys((r["batch"], r["ctx"]) for r in dec))
        names = [("split-KV decode kernel p16", "ours (paged)"), ("sdpa (contiguous)", "SDPA"),
                 ("fa3 kvcache (contiguous)", "FA3 kvcache")]
        width = 0.27
        for i, (key, label) in enumerate(names):
            vals = [next((float(r["pct_copy"]) for r in dec if (r["batch"], r["ctx"]) == sh
                          and r["contender"] == key and r["pct_copy"]), 0.0) for sh in shapes]
            b.bar([x + (i - 1) * width for x in range(len(shapes))], vals, width, label=label)
        b.set_xticks(range(len(shapes)), [f"B{x} ctx {c}" for x, c in shapes], fontsize=7)
        b.set_ylabel("% of copy bandwidth (K+V bytes read)")
        b.set_title("one-token decode")
        b.legend(fontsize=8)
    device, date = rows[0]["device"], rows[0]["date"]
    fig.suptitle(f"{device}, {date}, bf16, H=32, Hkv=8, D=128, CUDA-graph replays")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def main():
    def extra(p):
        p.add_argument("--only", default="few,mixed,short,decode",
                       help="sections, comma-separated (and probe)")
        p.add_argument("--variants", action="store_true",
                       help="also the variants that chose the static tables")
        p.add_argument("--plot", metavar="CSV",
                       help="only draw <CSV stem>.png (unified.png for unified.csv) from a CSV")
    args = parse_args(__doc__.splitlines()[0], extra)
    if args.plot:
        plot(args.plot, args.out / (Path(args.plot).stem + ".png"))
        return
    env = header("unified kernel", args.smoke)
    copy = copy_gbs(args.smoke)
    mm = matmul_tflops(args.smoke)
    print(f"ceilings: device copy {copy:.0f} GB/s (read + write), bf16 matmul {mm:.0f} TFLOP/s")
    sections = args.only.split(",")
    rows = []
    for name, run in (("probe", lambda: probe(args, copy)),
                      ("few", lambda: few_queries(args, copy)),
                      ("mixed", lambda: mixed(args, copy, mm)),
                      ("short", lambda: short_prompts(args, mm)),
                      ("decode", lambda: decode(args, copy)),
                      ("skewed", lambda: skewed(args, copy))):
        if name in sections:
            rows += run()
            for r in rows:
                r.update(copy_gbs=copy, matmul_tflops=mm, device=env["device"],
                         date=env["date"], torch=env["torch"], triton=env["triton"])
            write_csv(args.out / "unified.csv", rows)  # after every section: a cut run keeps it


if __name__ == "__main__":
    main()
