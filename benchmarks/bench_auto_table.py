"""Measure every CUDA backend per static configuration and regenerate the "auto" table.

For each key of the grid (op x dtype x head-dim bucket x KV layout x, for prefill, short or
long keys; see attn_ops/auto_table.py), each backend that supports it is first checked against
the reference on a small batch, then timed through ``torch.ops.attn.*`` under
``attn_ops.use_backend`` on two workloads of different shape (``--quick``: bf16, head dim 128
only; ``--ops``: only these ops, the other keys kept from the installed table). The winner per
key is the lowest geometric mean of the workload medians, exact ties broken by a fixed order
(``auto_table_builder.TIE_ORDER``). The reference backend is timed for store_kvcache only: for
prefill/decode it materialises [B, H, S, S] fp32 scores and is not a contender
(``--with-reference`` times it anyway).

Writes to ``--out`` (default benchmarks/results):
* ``auto_table.csv``: one row per key x workload x backend (median us, TFLOP/s or GB/s, the
  flash provider's id (``impl``: "fa3_fwd", "aten", ...) and label, or why a backend was
  skipped);
* ``auto_table.json``: the table, also installed as attn_ops/auto_table.json unless
  ``--smoke`` or ``--no-install`` (the entries of keys not measured here, and each key's runs
  measured with other flash providers, are kept: ``auto_table_builder``);
* ``auto_table.md``: which backend "auto" picks per key and by how much, for BENCHMARKS.md.

Usage on a GPU::

    python benchmarks/bench_auto_table.py --out "$OUT"
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import sys
import time
from pathlib import Path
from typing import Callable

import common  # benchmarks/common.py: argument parsing, timing, CSV, environment
import torch

import auto_table_builder  # benchmarks/auto_table_builder.py (after common: checkout on sys.path)

import attn_ops
from attn_ops import auto_table, contract
from attn_ops.backends import flash
from attn_ops.registry import get_backend_module

H, HKV = 32, 8  # the standard shapes' Hq=32, Hkv=8 (docs/measuring.md)
CHECK_TOL = {torch.float16: 4e-3, torch.bfloat16: 3.2e-2, torch.float32: 5e-3}


def _workloads(op: str, kv: str, keys: str, smoke: bool) -> dict[str, dict]:
    """Named dynamic shapes per op (lengths are device data; for prefill, the most keys of a
    sequence, ``max_seqlen_k``, is a host int and keys the table: ``short`` workloads have at
    most contract.SHORT_PREFILL_KEYS, ``long`` ones more)."""
    if smoke:
        return {"prefill": {"s": dict(lq=[13, 40], lk=[13, 40] if kv == "dense" else [37, 50])}
                if keys == "short" else {"l": dict(lq=[3], lk=[1030])},
                "decode": {"s": dict(lk=[0, 50, 3])},
                "store_kvcache": {"s": dict(t=37)}}[op]
    rng = random.Random(0)
    mixed = [rng.randint(128, 1024) for _ in range(16)]
    prefill = {
        ("dense", "short"): {"64x256": dict(lq=[256] * 64, lk=[256] * 64),
                             "16xmixed": dict(lq=mixed, lk=mixed)},
        ("dense", "long"): {"4x2048": dict(lq=[2048] * 4, lk=[2048] * 4),
                            "2x4096": dict(lq=[4096] * 2, lk=[4096] * 2)},
        ("paged", "short"): {"64x64/256": dict(lq=[64] * 64, lk=[256] * 64),
                             "16x128/1024": dict(lq=[128] * 16, lk=[1024] * 16)},
        ("paged", "long"): {"4x512/2048": dict(lq=[512] * 4, lk=[2048] * 4),
                            "2x1024/4096": dict(lq=[1024] * 2, lk=[4096] * 2)},
    }
    return {
        "prefill": prefill.get(("dense" if kv == "dense" else "paged", keys)),
        "decode": {"16x2048": dict(lk=[2048] * 16), "128x1024": dict(lk=[1024] * 128)},
        "store_kvcache": {"T256": dict(t=256), "T16384": dict(t=16384)},
    }[op]


def _check_shape(op: str, kv: str, smoke: bool) -> dict:
    """A small batch with an empty sequence, for the correctness gate before timing."""
    if smoke:
        return {"prefill": dict(lq=[5, 0, 9], lk=[5, 0, 9] if kv == "dense" else [12, 0, 20]),
                "decode": dict(lk=[0, 1, 20]), "store_kvcache": dict(t=9)}[op]
    return {"prefill": dict(lq=[13, 0, 123], lk=[13, 0, 123] if kv == "dense" else [40, 0, 300]),
            "decode": dict(lk=[0, 1, 300, 77]), "store_kvcache": dict(t=123)}[op]


def _paged(lens_k, block_size, d, dtype, dev):
    """Caches ``[num_blocks, block_size, HKV, d]`` and an int32 table of shuffled blocks."""
    need = [-(-n // block_size) for n in lens_k]
    width = max(need + [1])
    blocks = torch.randperm(sum(need) + 1, device=dev).to(torch.int32)
    table = torch.zeros(len(lens_k), width, dtype=torch.int32, device=dev)
    for b, start in enumerate(itertools.accumulate([0] + need[:-1])):
        table[b, :need[b]] = blocks[start:start + need[b]]
    shape = (sum(need) + 1, block_size, HKV, d)
    return (torch.randn(shape, dtype=dtype, device=dev),
            torch.randn(shape, dtype=dtype, device=dev), table)


@dataclasses.dataclass
class Case:
    run: Callable[[], object]       # the op through torch.ops.attn (backend from the context)
    observe: Callable[[], torch.Tensor]  # what to compare after run(): output or caches
    config: contract.OpConfig       # the op's static config
    work: float                     # FLOPs (prefill) or bytes moved (decode, store)


def _case(op: str, kv: str, shape: dict, d: int, dtype, dev) -> Case:
    size = torch.tensor([], dtype=dtype).element_size()
    if op == "store_kvcache":
        bs, t = int(kv[2:]), shape["t"]
        k_cache = torch.randn(-(-t // bs) * 2 + 1, bs, HKV, d, dtype=dtype, device=dev)
        v_cache = torch.randn_like(k_cache)
        key, value = (torch.randn(t, HKV, d, dtype=dtype, device=dev) for _ in range(2))
        slots = torch.randperm(k_cache.shape[0] * bs, device=dev)[:t]
        args = (key, value, k_cache, v_cache, slots)
        return Case(lambda: torch.ops.attn.store_kvcache.default(*args),
                    lambda: torch.cat([k_cache.flatten(), v_cache.flatten()]),
                    contract.store_config(key, k_cache, slots), 4 * t * HKV * d * size)
    last = {}  # the latest output only: timing loops must not pile up outputs
    if op == "decode":
        lk = shape["lk"]
        k_cache, v_cache, table = _paged(lk, int(kv[2:]), d, dtype, dev)
        q = torch.randn(len(lk), H, d, dtype=dtype, device=dev)
        seqlens = torch.tensor(lk, dtype=torch.int32, device=dev)
        args = (q, k_cache, v_cache, seqlens, table, d ** -0.5)
        return Case(lambda: last.update(out=torch.ops.attn.decode.default(*args)),
                    lambda: last["out"],
                    contract.decode_config(q, k_cache, -1, 0.0), 2 * sum(lk) * HKV * d * size)
    lq, lk = shape["lq"], shape["lk"]
    q = torch.randn(sum(lq), H, d, dtype=dtype, device=dev)
    cq = torch.tensor([0] + lq, device=dev).cumsum(0).to(torch.int32)
    ck = torch.tensor([0] + lk, device=dev).cumsum(0).to(torch.int32)
    if kv == "dense":
        k, v = (torch.randn(sum(lk), HKV, d, dtype=dtype, device=dev) for _ in range(2))
        table = None
    else:
        k, v, table = _paged(lk, int(kv[2:]), d, dtype, dev)
    args = (q, k, v, cq, ck, max(lq), max(lk), d ** -0.5, True, table)
    flops = sum(4 * H * d * a * (b - a / 2) for a, b in zip(lq, lk))
    return Case(lambda: last.update(out=torch.ops.attn.prefill.default(*args)), lambda: last["out"],
                contract.prefill_config(q, k, True, table, -1, 0.0, max_seqlen_k=max(lk)), flops)


def _reason(name: str, op: str, kv: str, d: int, dtype, dev, smoke: bool) -> str | None:
    """Why ``name`` is not timed for this key: unsupported, or wrong on a small batch."""
    shape = _check_shape(op, kv, smoke)
    torch.manual_seed(1)
    reason = get_backend_module(name).supports(_case(op, kv, shape, d, dtype, dev).config)
    if reason is not None or name == "reference":
        return reason
    results = []
    for backend in (name, "reference"):
        torch.manual_seed(1)  # the same inputs (and caches) for both
        case = _case(op, kv, shape, d, dtype, dev)
        with attn_ops.use_backend(backend):
            case.run()
        results.append(case.observe().float())
    got, want = results
    err = (got - want).abs().max().item() if want.numel() else 0.0
    if math.isfinite(err) and err <= CHECK_TOL[dtype] * (1 + want.abs().max().item()):
        return None
    return f"differs from the reference on a small batch (max abs err {err:.3g})"


def _grid(args):
    dtypes = [torch.float32] if args.smoke else [torch.bfloat16] if args.quick else \
        [torch.bfloat16, torch.float16]
    heads = [64] if args.smoke else [128] if args.quick else [64, 128, 256]
    layouts = {"prefill": ["dense", "bs16", "bs256"], "decode": ["bs16", "bs256"],
               "store_kvcache": ["bs16", "bs256"]}
    ops = args.ops.split(",") if args.ops else list(layouts)
    for dtype in dtypes:
        for d in heads:
            for op in ops:
                for kv in layouts[op]:
                    for keys in (("short", "long") if op == "prefill" else ("any",)):
                        yield op, dtype, d, kv, keys


def main():
    args = common.parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--quick", action="store_true", help="bf16 and head dim 128 only"),
        p.add_argument("--ops", default="", help="comma-separated ops to measure (default all)"),
        p.add_argument("--with-reference", action="store_true",
                       help="also time the reference backend for prefill and decode"),
        p.add_argument("--no-install", action="store_true",
                       help="do not rewrite attn_ops/auto_table.json"),
        p.add_argument("--note", default="", help="appended to the source of the runs")))
    env = common.header("auto table: backend timings per static configuration", args.smoke)
    dev = common.device(args)
    arch = "smoke" if args.smoke else auto_table.arch_of(dev)
    started, rows = time.perf_counter(), []
    for op, dtype, d, kv, keys in _grid(args):
        names = ["triton", "flash"] + (["reference"] if op == "store_kvcache"
                                       or args.with_reference else [])
        reasons = {name: _reason(name, op, kv, d, dtype, dev, args.smoke) for name in names}
        for wname, shape in _workloads(op, kv, keys, args.smoke).items():
            case = _case(op, kv, shape, d, dtype, dev)
            parts = auto_table.features(case.config, arch)
            assert parts[-1] == keys, (wname, parts)  # the workload lies in its key's bucket
            key = auto_table.make_key(parts)
            for name in names:
                row = dict(key=key, op=op, dtype=str(dtype).replace("torch.", ""), head_dim=d,
                           kv=kv, workload=wname, backend=name, median_us=None)
                reason = reasons[name]
                if reason is None:
                    if name == "flash":  # the provider's id keys the table's flash:<id> items
                        row["impl"] = flash.provider_id(case.config)
                        row["impl_label"] = flash.describe(case.config)
                    with attn_ops.use_backend(name):
                        ms, reason = common.try_time(lambda: case.run, args.smoke)
                    if ms is not None:
                        row["median_us"] = round(ms * 1e3, 3)
                        per, unit = (1e12, "TFLOP/s") if op == "prefill" else (1e9, "GB/s")
                        row["rate"], row["unit"] = round(case.work / (ms * 1e-3) / per, 2), unit
                row["skipped"] = reason or ""
                rows.append(row)
                print(f"  {key:30s} {wname:12s} {name:9s} {row['median_us'] or reason}",
                      file=sys.stderr)
    out = Path(args.out)
    common.write_csv(out / "auto_table.csv", rows)
    previous = {} if args.smoke else auto_table.load()
    meta = {k: env[k] for k in ("date", "device", "torch", "triton", "cuda") if k in env}
    timed = [r for r in rows if r["median_us"] is not None]
    meta["flash_providers"] = auto_table_builder.providers_of(timed)
    source = f"measured with benchmarks/bench_auto_table.py{' --quick' * args.quick} on " \
             f"{env['device']}" + (f"; {args.note}" if args.note else "")
    table = auto_table_builder.build_table(timed, source, meta, previous)
    text = auto_table_builder.dumps(table)
    (out / "auto_table.json").write_text(text)
    if not (args.smoke or args.no_install):
        auto_table.TABLE_PATH.write_text(text)
    summary = _markdown(table, env)
    (out / "auto_table.md").write_text(summary)
    print(summary)
    print(f"{len(rows)} timings in {time.perf_counter() - started:.0f} s; wrote {out}",
          file=sys.stderr)


def _markdown(table: dict, env: dict) -> str:
    lines = [f"### Which backend \"auto\" picks ({env['device']}, torch {env['torch']}, "
             f"triton {env['triton']}, {env['date']})", "",
             "Median us per backend (geometric mean over the key's workloads); speedup = "
             "runner-up time / winner time; `flash:<id>`: the flash backend on that provider. "
             "One row per run on this GPU (other GPUs' runs are kept in the table).", "",
             "| op | dtype | head | kv | keys | auto picks | speedup | medians (us) |",
             "|---|---|---|---|---|---|---|---|"]
    for key, entry in table["entries"].items():
        if "*" in key:
            continue
        for run in entry.get("runs", []):
            if run.get("device") != env["device"] or run.get("date") != env["date"]:
                continue
            op, _, dtype, head, kv, keys = key.split("|")
            times = ", ".join(f"{b} {t:.1f}" for b, t in run["median_us"].items())
            speed = f"{run['speedup']:.2f}x" if "speedup" in run else "only one"
            lines.append(f"| {op} | {dtype} | {head} | {kv} | {keys} | {run['order'][0]} | "
                         f"{speed} | {times} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
