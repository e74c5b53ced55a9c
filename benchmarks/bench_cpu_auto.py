"""CPU: the reference and sdpa backends side by side (store_kvcache, prefill, decode), to decide
what "auto" picks on the CPU.

Each configuration builds its inputs once, then runs ROUNDS rounds; a round times one batch of
back-to-back calls of every backend, in an order that alternates between rounds (so drift in the
machine's load hits both alike). A batch lasts at least BATCH_MS; per-call time is its wall time
over its call count, and the figure is the median over rounds. Calls go through
``torch.ops.attn.*`` under ``use_backend``, as a user's call does: the per-call host overhead of
the op (dispatcher, memoised checks) is in both figures. store_kvcache runs the same function on
both backends (sdpa reuses the reference's), so its rows measure the method's own noise.

One thread count per process (``--threads``, default: torch's own): switching
``torch.set_num_threads`` between rounds in one process made the later 2-thread calls 10-80x
slower (a tiny bf16 decode 0.17 -> 7.7 ms), so the counts run as separate invocations, each
writing ``cpu_auto_t<N>.csv``. The min over rounds (also in the CSV) is the figure least
disturbed by other load on the machine.

    python benchmarks/bench_cpu_auto.py [--quick] [--threads N] [--only decode] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from common import ROOT, print_table, write_csv

os.environ.setdefault("ATTN_OPS_CHECK", "0")  # the data checks sync the host: off when timing

BACKENDS = ("reference", "sdpa")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEADS = ((4, 2, 64), (32, 8, 128))  # (H, Hkv, D): a toy model, a Llama-8B-like layer
PAGE = 16


def _cases(quick: bool):
    """(op, dtype name, B, lq, lk, (H, Hkv, D), paged)."""
    batches_decode = (1, 8) if quick else (1, 8, 32)
    lens_decode = (16, 256) if quick else (16, 256, 2048)
    lens_prefill = (16, 128) if quick else (16, 128, 512)
    for dt in DTYPES:
        for heads in HEADS:
            for t in (1, 64, 1024):
                yield "store_kvcache", dt, 1, t, t, heads, True
            for b in batches_decode:
                for lk in lens_decode:
                    if b * lk <= 16384:  # the largest: 8 x 2048 tokens of context
                        yield "decode", dt, b, 1, lk, heads, True
            for b in (1, 4):
                for lk in lens_prefill:
                    yield "prefill", dt, b, lk, lk, heads, False
                # chunked prefill over a paged cache: the last quarter of lk tokens
                yield "prefill", dt, b, 32, 128, heads, True


def _build(op, dtype, b, lq, lk, heads, paged):
    """The call's arguments, random and never zero; returns a no-argument closure."""
    h, hkv, d = heads
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    blocks_per_seq = -(-lk // PAGE)
    num_blocks = b * blocks_per_seq + 1
    k_cache, v_cache = rnd(num_blocks, PAGE, hkv, d), rnd(num_blocks, PAGE, hkv, d)
    perm = torch.randperm(num_blocks, generator=g)[:b * blocks_per_seq]
    table = perm.view(b, blocks_per_seq).to(torch.int32)
    ops = torch.ops.attn
    if op == "store_kvcache":
        key, value = rnd(lq, hkv, d), rnd(lq, hkv, d)
        slots = torch.randperm(num_blocks * PAGE, generator=g)[:lq]
        return lambda: ops.store_kvcache.default(key, value, k_cache, v_cache, slots)
    scale = d ** -0.5
    if op == "decode":
        q = rnd(b, h, d)
        seqlens = torch.full((b,), lk, dtype=torch.int32)
        return lambda: ops.decode.default(q, k_cache, v_cache, seqlens, table, scale)
    q = rnd(b * lq, h, d)
    cu_q = torch.arange(b + 1, dtype=torch.int32) * lq
    cu_k = torch.arange(b + 1, dtype=torch.int32) * lk
    if paged:
        return lambda: ops.prefill.default(q, k_cache, v_cache, cu_q, cu_k, lq, lk, scale, True,
                                           table)
    k, v = rnd(b * lk, hkv, d), rnd(b * lk, hkv, d)
    return lambda: ops.prefill.default(q, k, v, cu_q, cu_k, lq, lk, scale, True)


def _batch_ms(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) * 1e3 / calls


def measure(fn_by_backend: dict, rounds: int, batch_ms: float) -> dict[str, tuple[float, float]]:
    """(median, min) per-call ms of each backend over interleaved rounds."""
    from attn_ops import registry
    calls = {}
    for name, fn in fn_by_backend.items():
        with registry.use_backend(name):
            fn(), fn()  # warm: memo, allocator
            one = _batch_ms(fn, 1)
        calls[name] = max(1, min(2000, int(batch_ms / max(one, 1e-3))))
    samples = {name: [] for name in fn_by_backend}
    names = list(fn_by_backend)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            with registry.use_backend(name):
                samples[name].append(_batch_ms(fn_by_backend[name], calls[name]))
    return {name: (statistics.median(s), min(s)) for name, s in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--quick", action="store_true", help="a smaller grid, 3 rounds")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for this run (default: torch's own)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-ms", type=float, default=30.0)
    parser.add_argument("--only", default=None, help="one op: store_kvcache, prefill, decode")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    rounds = 3 if args.quick else args.rounds
    rows = []
    for op, dt, b, lq, lk, heads, paged in _cases(args.quick):
        if args.only and op != args.only:
            continue
        fns = {name: _build(op, DTYPES[dt], b, lq, lk, heads, paged) for name in BACKENDS}
        with torch.inference_mode():
            ms = measure(fns, rounds, args.batch_ms)
        ref, sdpa = ms["reference"], ms["sdpa"]
        ratio = sdpa[0] / ref[0]
        rows.append(dict(op=op, dtype=dt, batch=b, len_q=lq, len_k=lk, heads=heads[0],
                         kv_heads=heads[1], head_dim=heads[2], paged=paged, threads=threads,
                         reference_ms=round(ref[0], 4), sdpa_ms=round(sdpa[0], 4),
                         sdpa_over_reference=round(ratio, 3),
                         reference_min_ms=round(ref[1], 4), sdpa_min_ms=round(sdpa[1], 4),
                         min_ratio=round(sdpa[1] / ref[1], 3),
                         load_avg=os.getloadavg()[0], torch=torch.__version__))
        print(f"{op:13s} {dt} B={b:<3d} lq={lq:<5d} lk={lk:<5d} H={heads[0]:<3d} "
              f"D={heads[2]:<4d} ref {ref[0]:9.3f} ms  sdpa {sdpa[0]:9.3f} ms  "
              f"x{ratio:.2f} (min x{sdpa[1] / ref[1]:.2f})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = (f"cpu_auto_t{threads}" + ("_quick" if args.quick else "")
            + (f"_{args.only}" if args.only else ""))
    write_csv(out / f"{name}.csv", rows)
    print_table(rows, ["op", "dtype", "batch", "len_q", "len_k", "heads", "head_dim", "paged",
                       "threads", "reference_ms", "sdpa_ms", "sdpa_over_reference", "min_ratio"])


if __name__ == "__main__":
    main()
