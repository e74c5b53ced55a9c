"""KV-cache store bandwidth: our one-launch Triton kernel beside torch index_copy_ / index_put_
and the reference backend, in one run.

bf16, Hkv=8, D=128, page 16, random distinct slots in a cache of 2*T slots (at least 64k).
GB/s = 4 * T * Hkv * D * 2 bytes (read key and value, write both caches) / time, from CUDA-graph
replays (device time) beside eager calls (host launch cost included); % is of the device copy
bandwidth measured in this run.

    python benchmarks/bench_store.py [--out DIR]
"""

from __future__ import annotations

import torch

from common import (copy_gbs, device, header, parse_args, print_table, time_contender,
                    write_csv)

HKV, D, PAGE = 8, 128, 16


def contenders(key, value, k_cache, v_cache, slots):
    import attn_ops
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    k_flat, v_flat = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)

    def ours():
        return lambda: attn_ops.store_kvcache(key, value, k_cache, v_cache, slots,
                                              backend="triton"), "one launch"

    def index_copy():
        def run():
            k_flat.index_copy_(0, slots, key)
            v_flat.index_copy_(0, slots, value)
        return run, "two launches, no -1 handling"

    def index_put():
        def run():
            k_flat.index_put_((slots,), key)
            v_flat.index_put_((slots,), value)
        return run, "two launches, no -1 handling"

    def reference():
        return lambda: attn_ops.store_kvcache(key, value, k_cache, v_cache, slots,
                                              backend="reference"), "handles -1 (where + copy)"

    return {"triton (ours)": ours, "index_copy_": index_copy, "index_put_": index_put,
            "reference backend": reference}


def main():
    args = parse_args(__doc__.splitlines()[0])
    env = header("store_kvcache", args.smoke)
    copy = copy_gbs(args.smoke)
    print(f"ceiling: device copy {copy:.0f} GB/s (read + write)")
    dev = device(args)
    hkv, d = (2, 32) if args.smoke else (HKV, D)
    rows = []
    for t in ([13, 64] if args.smoke else [64, 4096, 65536]):
        num_slots = max(2 * t, 65536 if not args.smoke else 128)
        k_cache = torch.randn(num_slots // PAGE, PAGE, hkv, d, device=dev, dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        key = torch.randn(t, hkv, d, device=dev, dtype=torch.bfloat16)
        value = torch.randn_like(key)
        slots = torch.randperm(num_slots, device=dev)[:t]
        nbytes = 4 * t * hkv * d * 2
        for name, factory in contenders(key, value, k_cache, v_cache, slots).items():
            eager, graph, note = time_contender(factory, args.smoke)
            gbs = nbytes / (graph * 1e-3) / 1e9 if graph else None
            rows.append(dict(bench="store", tokens=t, kv_heads=hkv, head_dim=d, page=PAGE,
                             contender=name, eager_us=eager * 1e3 if eager else None,
                             graph_us=graph * 1e3 if graph else None,
                             eager_gbs=nbytes / (eager * 1e-3) / 1e9 if eager else None,
                             gbs=gbs, pct_copy=100 * gbs / copy if gbs else None,
                             note=note))
    for r in rows:
        r.update(copy_gbs=copy, device=env["device"], date=env["date"], torch=env["torch"],
                 triton=env["triton"])
    write_csv(args.out / "store.csv", rows)
    print_table(rows, ["tokens", "contender", "eager_us", "graph_us", "eager_gbs", "gbs",
                       "pct_copy", "note"])


if __name__ == "__main__":
    main()
