"""merge_states bandwidth: the Triton kernel beside the reference backend and a plain copy of the
same bytes, in one run (issue 16's target: merge_states at copy bandwidth).

bf16, H=32, D=128, N rows (tokens or decode sequences). Bytes moved = read out_a, out_b
(2 * N * H * D * 2) + write out (N * H * D * 2) + lses (3 * N * H * 4); GB/s from CUDA-graph
replays, % of the device copy bandwidth measured in this run. The "copy" contender moves the same
bytes with two ``torch.add`` reads and one write (out = out_a + out_b; lse = lse_a + lse_b): the
ceiling a merge can reach.

    python benchmarks/bench_merge_states.py [--out DIR] [--smoke]
"""

from __future__ import annotations

import torch

from common import (copy_gbs, device, header, parse_args, print_table, time_contender,
                    write_csv)

H, D = 32, 128


def contenders(out_a, lse_a, out_b, lse_b):
    import attn_ops

    def ours():
        return lambda: attn_ops.merge_states(out_a, lse_a, out_b, lse_b,
                                             backend="triton"), "one launch"

    def reference():
        return lambda: attn_ops.merge_states(out_a, lse_a, out_b, lse_b,
                                             backend="reference"), "vectorised torch"

    def copy():
        return lambda: (torch.add(out_a, out_b), torch.add(lse_a, lse_b)), "same bytes, no math"

    return {"triton (ours)": ours, "reference backend": reference, "copy (ceiling)": copy}


def main():
    args = parse_args(__doc__.splitlines()[0])
    env = header("merge_states", args.smoke)
    ceiling = copy_gbs(args.smoke)
    print(f"ceiling: device copy {ceiling:.0f} GB/s (read + write)")
    dev = device(args)
    h, d = (4, 32) if args.smoke else (H, D)
    rows = []
    for n in ([13] if args.smoke else [16, 256, 4096, 65536]):
        out_a, out_b = (torch.randn(n, h, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
        lse_a, lse_b = (torch.randn(n, h, device=dev) for _ in range(2))
        nbytes = 3 * n * h * d * 2 + 3 * n * h * 4
        for name, factory in contenders(out_a, lse_a, out_b, lse_b).items():
            eager, graph, note = time_contender(factory, args.smoke)
            gbs = nbytes / (graph * 1e-3) / 1e9 if graph else None
            rows.append(dict(bench="merge_states", rows=n, heads=h, head_dim=d, contender=name,
                             eager_us=eager * 1e3 if eager else None,
                             graph_us=graph * 1e3 if graph else None, gbs=gbs,
                             pct_copy=100 * gbs / ceiling if gbs else None, note=note))
    for r in rows:
        r.update(copy_gbs=ceiling, device=env["device"], date=env["date"], torch=env["torch"],
                 triton=env["triton"])
    write_csv(args.out / "merge_states.csv", rows)
    print_table(rows, ["rows", "contender", "eager_us", "graph_us", "gbs", "pct_copy", "note"])


if __name__ == "__main__":
    main()
