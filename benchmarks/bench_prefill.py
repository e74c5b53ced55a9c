"""Prefill throughput: our Triton kernel beside SDPA (flash, efficient, cuDNN), FlexAttention,
FA2 varlen and FA3 (PyPI ``fa3-fwd``, when installed) varlen and dense, in one run.

bf16, H=32, Hkv=8, D=128. Causal over sequence lengths 1024..16384 with B*S = 16384 tokens
(4 x 4096 is the target shape), and non-causal 4 x 4096. TFLOP/s counts 4*H*D*lq*(lk - lq/2) per
causal sequence (4*H*D*lq*lk otherwise); % is of the bf16 matmul rate measured in this run.
SDPA contenders get GQA through ``enable_gqa=True`` where the backend takes it, else K/V
expanded to H heads (noted in the CSV).

    python benchmarks/bench_prefill.py [--tune] [--only dense|paged] [--graph]
                                       [--extras-only] [--out DIR]

``--only paged``: only the paged-prefix section (new tokens over a prefix held in a paged
cache, prefix reuse and chunked prefill). ``--graph``: the dense section also times CUDA-graph
replays (``graph_ms``, ``graph_tflops``): device time without the host's share, which eager
calls of a few hundred microseconds (FA3's Python entry, our two launches) can still carry.
``--extras-only``: sinks and the lse output against the plain call, through the op
(prefill_extras.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common import (copy_gbs, device, header, matmul_tflops, parse_args, print_table,
                    time_contender, try_time, write_csv)

H, HKV, D = 32, 8, 128
TOKENS = 16384


def flops(b: int, s: int, causal: bool, h: int = H, d: int = D) -> float:
    return b * 4 * h * d * s * (s - s / 2 if causal else s)


def make_inputs(b, s, dev, h=H, hkv=HKV, d=D):
    q = torch.randn(b * s, h, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b * s, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = torch.arange(b + 1, device=dev, dtype=torch.int32) * s
    return q, k, v, cu


def contenders(q, k, v, cu, b, s, causal, dev):
    """name -> factory returning (callable, note). Dense views [B, H, S, D] for SDPA/Flex."""
    import attn_ops
    from torch.nn.attention import SDPBackend, sdpa_kernel
    h, d = q.shape[1], q.shape[2]
    scale = d ** -0.5
    qd = q.view(b, s, h, d).transpose(1, 2)
    kd = k.view(b, s, -1, d).transpose(1, 2)
    vd = v.view(b, s, -1, d).transpose(1, 2)
    group = h // kd.shape[1]

    def ours():
        return lambda: attn_ops.prefill(q, k, v, cu, cu, s, s, scale, causal, backend="triton"), ""

    def sdpa(backend):
        def factory():
            def run_gqa():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal,
                                                          scale=scale, enable_gqa=True)
            try:
                run_gqa()
                return run_gqa, "enable_gqa"
            except RuntimeError:
                ke, ve = kd.repeat_interleave(group, 1), vd.repeat_interleave(group, 1)

                def run():
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(qd, ke, ve, is_causal=causal,
                                                              scale=scale)
                run()
                return run, "kv expanded to H heads"
        return factory

    def flex():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        mask = None
        if causal:
            mask = create_block_mask(lambda bb, hh, qi, kj: qi >= kj, None, None, s, s,
                                     device=dev)
        fn = torch.compile(flex_attention, dynamic=False)
        run = lambda: fn(qd, kd, vd, block_mask=mask, scale=scale, enable_gqa=True)  # noqa: E731
        run()
        return run, "compiled"

    def fa2_varlen():
        op = torch.ops.aten._flash_attention_forward
        run = lambda: op(q, k, v, cu, cu, s, s, 0.0, causal, False, scale=scale)  # noqa: E731
        run()
        return run, "aten._flash_attention_forward"

    def flash_attn_pkg():
        from flash_attn import flash_attn_varlen_func
        run = lambda: flash_attn_varlen_func(q, k, v, cu, cu, s, s, softmax_scale=scale,  # noqa
                                             causal=causal)
        run()
        return run, "flash_attn package"

    def ours_flash():  # the flash backend (FA3 when installed) through the op path
        run = lambda: attn_ops.prefill(q, k, v, cu, cu, s, s, scale, causal,  # noqa: E731
                                       backend="flash")
        run()
        from attn_ops.backends import flash
        return run, flash.describe(attn_ops.prefill_config(q, k, causal=causal))

    def fa3_varlen():
        import fa3_fwd_interface as fa3  # PyPI fa3-fwd: forward-only FA3, bf16
        run = lambda: fa3.flash_attn_varlen_func(q, k, v, cu, cu, s, s, softmax_scale=scale,  # noqa
                                                 causal=causal)
        run()
        return run, "fa3-fwd varlen"

    def fa3_dense():
        import fa3_fwd_interface as fa3
        qb, kb, vb = q.view(b, s, h, d), k.view(b, s, -1, d), v.view(b, s, -1, d)
        run = lambda: fa3.flash_attn_func(qb, kb, vb, softmax_scale=scale, causal=causal)  # noqa
        run()
        return run, "fa3-fwd dense"

    return {
        "triton (ours)": ours,
        "attn_ops flash backend": ours_flash,
        "fa3_varlen": fa3_varlen,
        "fa3_dense": fa3_dense,
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "flex": flex,
        "fa2_varlen": fa2_varlen,
        "flash_attn": flash_attn_pkg,
    }


def run_shape(b, s, causal, args, ceil_tflops, with_flex=True):
    dev = device(args)
    h, hkv, d = (4, 2, 32) if args.smoke else (H, HKV, D)
    q, k, v, cu = make_inputs(b, s, dev, h, hkv, d)
    rows = []
    for name, factory in contenders(q, k, v, cu, b, s, causal, dev).items():
        if name == "flex" and not with_flex:
            continue  # each Flex shape costs a compile; timed at a subset of lengths
        ms, graph_ms, note = time_contender(factory, args.smoke, graph=args.graph)
        work = flops(b, s, causal, h, d)
        tflops = work / (ms * 1e-3) / 1e12 if ms else None
        rows.append(dict(bench="prefill", batch=b, seqlen=s, causal=causal, heads=h,
                         kv_heads=hkv, head_dim=d, contender=name, ms=ms, tflops=tflops,
                         pct_matmul=100 * tflops / ceil_tflops if tflops else None,
                         note=note))
        if args.graph:
            rows[-1].update(graph_ms=graph_ms,
                            graph_tflops=work / (graph_ms * 1e-3) / 1e12 if graph_ms else None)
    ours = rows[0]["tflops"] if rows and rows[0]["contender"] == "triton (ours)" else None
    for r in rows:
        r["ours_speedup"] = ours / r["tflops"] if ours and r["tflops"] else None
    del q, k, v
    return rows


def paged_prefix(args, ceil_tflops):
    """New tokens over a prefix held in a paged cache (pages of 16 in shuffled order): chunked
    prefill and prefix reuse. Ours through the route, the guarded Hopper entry alone, the
    FA2-style and unified kernels, and FA3 varlen over a dense copy of the same keys (what a
    dense kernel does with no page gather; bottom-right causal, as ours)."""
    import attn_ops
    from attn_ops.backends.triton import hopper_prefill_launch as hopper
    from attn_ops.backends.triton import prefill_kernel, unified_kernel
    dev = device(args)
    h, hkv, d, page = (4, 2, 32, 16) if args.smoke else (H, HKV, D, 16)
    cases = [(2, 16, 48)] if args.smoke else [(4, 1024, 3072), (2, 512, 4096), (1, 4096, 12288),
                                              (8, 2048, 2048)]
    rows = []
    for b, new, prefix in cases:
        lq, lk = new, new + prefix
        pages = b * lk // page
        k_cache = torch.randn(pages, page, hkv, d, device=dev, dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        table = torch.randperm(pages, device=dev).to(torch.int32).view(b, lk // page)
        q = torch.randn(b * lq, h, d, device=dev, dtype=torch.bfloat16)
        cq = torch.arange(b + 1, device=dev, dtype=torch.int32) * lq
        ck = torch.arange(b + 1, device=dev, dtype=torch.int32) * lk
        sc = d ** -0.5
        args_ = (q, k_cache, v_cache, cq, ck, lq, lk, sc, True, table)
        kd = k_cache[table.flatten().long()].view(b * lk, hkv, d)  # the same keys, dense
        vd = v_cache[table.flatten().long()].view(b * lk, hkv, d)

        def fa3():
            import fa3_fwd_interface as fa3_mod
            run = lambda: fa3_mod.flash_attn_varlen_func(  # noqa: E731
                q, kd, vd, cq, ck, lq, lk, softmax_scale=sc, causal=True)
            run()
            return run, "fa3-fwd varlen, dense copy of the keys"

        def hopper_bound():
            run = hopper.bind_prefill_guarded(*args_)
            return (lambda: run(*args_)), "guarded, bound"
        runs = {"triton (ours, route)": lambda: ((lambda: attn_ops.prefill(
                    *args_, backend="triton")), ""),
                "hopper kernel, paged": hopper_bound,
                "FA2-style kernel, paged": lambda: ((lambda: prefill_kernel.prefill(*args_)), ""),
                "unified kernel, paged": lambda: ((lambda: unified_kernel.prefill(*args_)), ""),
                "fa3_varlen (dense keys)": fa3}
        fl = b * 4 * h * d * lq * (lk - lq / 2)
        for name, factory in runs.items():
            ms, _, note = time_contender(factory, args.smoke, graph=False)
            tf = fl / (ms * 1e-3) / 1e12 if ms else None
            rows.append(dict(bench="prefill_paged_prefix", batch=b, seqlen=lq, prefix=prefix,
                             causal=True, heads=h, kv_heads=hkv, head_dim=d, page=page,
                             contender=name, ms=ms, tflops=tf,
                             pct_matmul=100 * tf / ceil_tflops if tf else None, note=note))
        del k_cache, v_cache, kd, vd, q
    print_table(rows, ["batch", "seqlen", "prefix", "contender", "ms", "tflops", "pct_matmul",
                       "note"])
    return rows


def tune(args, ceil_tflops):
    """Sweep (BLOCK_M, BLOCK_N, warps, stages) of our kernel on 4 x 4096 (and D=64/256)."""
    from attn_ops.backends.triton import prefill_kernel
    dev = device(args)
    rows = []
    cases = [(128, True), (128, False), (64, True), (256, True)]
    configs = {  # (BLOCK_M, BLOCK_N, warps, stages); the first of each list is the reference
        128: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2),
              (64, 64, 4, 3), (256, 64, 16, 3)],
        -128: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4)],
        64: [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3)],
        256: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 3)],
    }
    b, s, h, hkv = (1, 64, 2, 1) if args.smoke else (4, 4096, H, HKV)
    for d, causal in cases[:1] if args.smoke else cases:
        q, k, v, cu = make_inputs(b, s, dev, h, hkv, d if not args.smoke else 32)
        table = configs[d if causal else -d]
        base = prefill_kernel.prefill(q, k, v, cu, cu, s, s, d ** -0.5, causal,
                                      config=prefill_kernel.Config(*table[0])).float()
        for cfg in table[:2] if args.smoke else table:
            cfg = prefill_kernel.Config(*cfg)
            try:  # every variant must compute the same function as the first config
                got = prefill_kernel.prefill(q, k, v, cu, cu, s, s, d ** -0.5, causal, config=cfg)
                max_diff = (got.float() - base).abs().max().item()
            except Exception:
                max_diff = None
            ms, err = try_time(lambda: (lambda: prefill_kernel.prefill(
                q, k, v, cu, cu, s, s, d ** -0.5, causal, config=cfg)), args.smoke)
            tflops = flops(b, s, causal, h, q.shape[2]) / (ms * 1e-3) / 1e12 if ms else None
            rows.append(dict(head_dim=d, causal=causal, **cfg._asdict(), max_diff=max_diff,
                             ms=ms, tflops=tflops,
                             pct_matmul=100 * tflops / ceil_tflops if tflops else None,
                             error=err))
            print_table(rows[-1:], ["head_dim", "causal", "block_m", "block_n", "warps",
                                    "stages", "max_diff", "ms", "tflops",
                                    "error"])
    write_csv(args.out / "prefill_tune.csv", rows)


def main():
    def extra(p):
        p.add_argument("--only", default=None, help="one section: dense or paged (default: both)")
        p.add_argument("--graph", action="store_true",
                       help="dense section: also time CUDA-graph replays")
        p.add_argument("--extras-only", action="store_true",
                       help="only sinks and the lse against the plain call (prefill_extras.py)")
    args = parse_args(__doc__.splitlines()[0], extra)
    env = header("prefill", args.smoke)
    if args.extras_only:
        from prefill_extras import extras
        extras(args, make_inputs, flops)
        return
    ceil = matmul_tflops(args.smoke)
    print(f"ceilings: bf16 matmul {ceil:.0f} TFLOP/s, copy {copy_gbs(args.smoke):.0f} GB/s")
    if args.tune or args.tune_only:
        tune(args, ceil)
    if args.tune_only:
        return
    if args.only in (None, "paged"):
        paged = paged_prefix(args, ceil)
        for r in paged:
            r.update(matmul_tflops=ceil, device=env["device"], date=env["date"])
        write_csv(args.out / "prefill_paged_prefix.csv", paged)
    if args.only == "paged":
        return
    rows = []
    lengths = [32, 64] if args.smoke else [256, 1024, 2048, 4096, 8192, 16384]
    tokens = 64 if args.smoke else TOKENS
    for s in lengths:
        rows += run_shape(max(1, tokens // s), s, True, args, ceil,
                          with_flex=args.smoke or s in (1024, 4096, 16384))
    rows += run_shape(2 if args.smoke else 4, lengths[-1] if args.smoke else 4096, False, args,
                      ceil)
    for r in rows:
        r.update(matmul_tflops=ceil, device=env["device"], date=env["date"],
                 torch=env["torch"], triton=env["triton"])
    write_csv(args.out / "prefill.csv", rows)
    print_table(rows, ["batch", "seqlen", "causal", "contender", "ms", "tflops", "pct_matmul",
                       "ours_speedup"] + ["graph_ms", "graph_tflops"] * args.graph + ["note"])


if __name__ == "__main__":
    main()
