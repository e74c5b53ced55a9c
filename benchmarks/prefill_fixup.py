"""The Hopper prefill route's second launch, its fixup, as a programmatic dependent of the Gluon
kernel or as a plain launch (``hopper_prefill_launch.FIXUP_PDL``), beside the Gluon kernel
alone and SDPA on cuDNN: bench_prefill.py ``--fixup-pdl-only``.

Each variant of the route is the entry bound to the call signature (what the op runs), bound
once with the fixup dependent and once without, in the same process; rounds interleaved,
median of 3 rounds of the two timings of common.bench_ms (eager ``do_bench``, CUDA-graph
replays). The kernel alone makes no fixup launch: the floor the two-launch route can reach.
Eager figures of the kernel alone carry its unbound launch's host time (Gluon's Python
launcher, ~100 us); its graph figures do not. Writes prefill_fixup_pdl.csv.
"""

from __future__ import annotations

import statistics

import torch

from common import bench_ms, print_table, write_csv

SHAPES = [(64, 256, True), (16, 1024, True), (4, 4096, True), (4, 4096, False)]


def _variants(q, k, v, cu, s, causal, contenders_of):
    """name -> callable: the bound route with the fixup dependent and plain, the kernel alone,
    SDPA cuDNN."""
    from attn_ops.backends.triton import hopper_prefill_launch as hp
    scale = q.shape[2] ** -0.5
    args = (q, k, v, cu, cu, s, s, scale, causal)
    fns = {}
    for pdl in (True, False):
        saved, hp.FIXUP_PDL = hp.FIXUP_PDL, pdl
        try:
            run = hp.bind_prefill_guarded(*args)
        finally:
            hp.FIXUP_PDL = saved
        fns["route, fixup dependent" if pdl else "route, fixup plain"] = (
            lambda run=run: run(*args))
    out = torch.empty_like(q)
    fns["gluon kernel alone"] = lambda: hp.prefill(*args, out=out)
    cudnn, _ = contenders_of()["sdpa_cudnn"]()
    fns["sdpa_cudnn"] = cudnn
    return fns


def fixup_pdl(args, make_inputs, contenders, flops, rounds: int = 3) -> list[dict]:
    """Rows of prefill_fixup_pdl.csv (see the module docstring)."""
    from attn_ops.backends.triton import hopper_prefill_launch as hp
    if args.smoke or not hp.available():
        print("fixup-pdl: needs an sm90 GPU and Gluon's Hopper API; skipped")
        return []
    rows = []
    for b, s, causal in SHAPES:
        q, k, v, cu = make_inputs(b, s, "cuda")
        fns = _variants(q, k, v, cu, s, causal,
                        lambda: contenders(q, k, v, cu, b, s, causal, "cuda"))
        times: dict[str, list] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name].append((bench_ms(fn), bench_ms(fn, graph=True)))
        work = flops(b, s, causal)
        plain = statistics.median(t[1] for t in times["route, fixup plain"])
        cudnn = statistics.median(t[1] for t in times["sdpa_cudnn"])
        for name, ts in times.items():
            eager = statistics.median(t[0] for t in ts)
            graph = statistics.median(t[1] for t in ts)
            rows.append(dict(bench="prefill_fixup_pdl", batch=b, seqlen=s, causal=causal,
                             contender=name, eager_ms=eager, graph_ms=graph,
                             graph_tflops=work / (graph * 1e-3) / 1e12,
                             plain_over_this=plain / graph, cudnn_over_this=cudnn / graph))
        print_table(rows[-len(fns):], ["batch", "seqlen", "causal", "contender", "eager_ms",
                                       "graph_ms", "graph_tflops", "plain_over_this",
                                       "cudnn_over_this"])
    write_csv(args.out / "prefill_fixup_pdl.csv", rows)
    return rows
