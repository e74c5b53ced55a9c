"""Prefill with sinks and the lse output against the plain call (bench_prefill.py
``--extras-only``): issue #16's "sinks and LSE cost <= 3%", for prefill.

Through the op on the Triton backend (``attn_ops.prefill`` / ``prefill_with_lse``): plain,
sinks, the lse, both; beside them the FA2-style kernel with both (prefill_kernel.prefill: the
kernel that served such calls on sm90 before the Gluon prefill took them). bf16, 32/8 heads,
D 128; rounds interleaved, median of 3 rounds of the two timings of common.bench_ms (eager
``do_bench``, CUDA-graph replays); ``cost_pct`` is each variant's graph time over the plain
call's. Writes prefill_extras.csv.
"""

from __future__ import annotations

import statistics

import torch

from common import bench_ms, print_table, write_csv

SHAPES = [(64, 256, True), (16, 1024, True), (4, 4096, True), (4, 4096, False),
          (1, 16384, True)]
SMOKE_SHAPES = [(2, 32, True)]


def extras(args, make_inputs, flops) -> list[dict]:
    """Rows of prefill_extras.csv (see the module docstring)."""
    import attn_ops
    from attn_ops.backends.triton import prefill_kernel
    dev = "cpu" if args.smoke else "cuda"
    heads = (4, 2, 32) if args.smoke else (32, 8, 128)
    rows = []
    for b, s, causal in SMOKE_SHAPES if args.smoke else SHAPES:
        q, k, v, cu = make_inputs(b, s, dev, *heads)
        sinks = torch.randn(q.shape[1], device=dev) * 2
        call = (q, k, v, cu, cu, s, s, q.shape[2] ** -0.5, causal, None, -1, 0.0)
        variants = {
            "plain": lambda: attn_ops.prefill(*call, backend="triton"),
            "sinks": lambda: attn_ops.prefill(*call, sinks, backend="triton"),
            "lse": lambda: attn_ops.prefill_with_lse(*call, backend="triton"),
            "sinks + lse": lambda: attn_ops.prefill_with_lse(*call, sinks, backend="triton"),
            "FA2-style kernel, sinks + lse": lambda: prefill_kernel.prefill(
                *call, sinks, return_lse=True),
        }
        times: dict[str, list] = {name: [] for name in variants}
        for _ in range(1 if args.smoke else 3):
            for name, fn in variants.items():
                times[name].append((bench_ms(fn, args.smoke),
                                    bench_ms(fn, args.smoke, graph=not args.smoke)))
        work = flops(b, s, causal, heads[0], heads[2])
        plain = statistics.median(t[1] for t in times["plain"])
        for name, ts in times.items():
            eager = statistics.median(t[0] for t in ts)
            graph = statistics.median(t[1] for t in ts)
            rows.append(dict(bench="prefill_extras", batch=b, seqlen=s, causal=causal,
                             contender=name, eager_ms=eager, graph_ms=graph,
                             graph_tflops=work / (graph * 1e-3) / 1e12,
                             cost_pct=100 * (graph / plain - 1)))
        print_table(rows[-len(variants):], ["batch", "seqlen", "causal", "contender", "eager_ms",
                                            "graph_ms", "graph_tflops", "cost_pct"])
    write_csv(args.out / "prefill_extras.csv", rows)
    return rows
