"""Scaling over ranks: context-parallel prefill and a tensor-parallel decode step vs one GPU.

Run with ``torchrun --nproc-per-node 2 benchmarks/bench_distributed.py`` on a machine with two
GPUs (NCCL; keep ``NCCL_NVLS_ENABLE=0``). Rank 0 writes ``distributed_cp.csv`` and
``distributed_tp.csv`` under ``--out``.

* Context parallel (bf16, H=32, Hkv=8, D=128, one causal sequence of ``--seq-lens`` tokens):
  ``attn.prefill`` over the whole sequence on rank 0's GPU alone (the other rank waits), then
  :func:`attn_ops.distributed.context_parallel_prefill` on all ranks, each method. A rep is timed
  on every rank with CUDA events between barriers; its time is the slowest rank's; the table
  gives the median rep and the speed-up over one GPU.
* Tensor parallel (bf16, a Llama-8B-shaped ``DemoLlama``: hidden 4096, 32/8 heads, MLP 14336,
  ``--tp-layers`` layers, vocab 32000): one decode step of ``--tp-batch`` sequences holding
  ``--tp-context`` cached tokens each, on one GPU vs split over all ranks, eager and as CUDA-graph
  replays. The cache contents are random: the step's cost does not depend on them.

Nothing here checks values: the examples do (examples/context_parallel.py, tensor_parallel.py).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

os.environ.setdefault("ATTN_OPS_CHECK", "0")  # data checks sync the host: off when timing
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attn_ops.demo.model import DemoConfig, DemoLlama  # noqa: E402
from attn_ops.distributed import (HeadShardedKVCache, context_parallel_prefill,  # noqa: E402
                                  llama_tp_plan, shard_sequence)
from attn_ops.distributed.context_parallel import METHODS  # noqa: E402
from attn_ops.distributed.launch import init_from_env  # noqa: E402
from common import captured  # noqa: E402  (benchmarks/common.py, beside this file)

H, HKV, D = 32, 8, 128


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--seq-lens", type=int, nargs="*", default=[32768, 131072])
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tp-layers", type=int, default=2)
    p.add_argument("--tp-batch", type=int, nargs="*", default=[1, 64])
    p.add_argument("--tp-context", type=int, default=4096)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU ranks (gloo): checks the script; numbers mean nothing")
    return p.parse_args()


DEV = "cuda"  # --smoke: "cpu" (gloo, wall clock, no graphs): checks the script, not the speed


def time_once(fn) -> float:
    """ms of one call of ``fn``: CUDA events on the GPU, the wall clock on the CPU."""
    if DEV == "cpu":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def timed_reps(fn, reps: int, solo: bool = False) -> float:
    """Median over reps of the slowest rank's time (ms); ``solo``: rank 0 alone runs ``fn``."""
    rank = dist.get_rank()
    times = []
    for i in range(reps + 2):  # two warm-ups (Triton compiles, NCCL connects)
        dist.barrier()
        ms = torch.tensor([time_once(fn) if not solo or rank == 0 else 0.0], device=DEV)
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        if i >= 2:
            times.append(ms.item())
    return statistics.median(times)


def bench_context_parallel(args, rows: list) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    scale = D ** -0.5
    for s in args.seq_lens:
        gen = torch.Generator(device=DEV).manual_seed(0)
        q, k, v = (torch.randn(s, n, D, device=DEV, dtype=torch.bfloat16, generator=gen)
                   for n in (H, HKV, HKV))
        cu = torch.tensor([0, s], dtype=torch.int32, device=DEV)
        flops = 4 * H * D * s * (s + 1) / 2
        one = timed_reps(lambda: torch.ops.attn.prefill(q, k, v, cu, cu, s, s, scale, True),
                         args.reps, solo=True)
        rows.append(dict(seq_len=s, ranks=1, method="one GPU", ms=one, tflops=flops / one / 1e9,
                         speedup=1.0, note=""))
        # Reading the keys through a block table of 2R pages of C tokens (the all-gather
        # method's first form, 0.78x on an H200): what the paging costs on one GPU.
        c = s // (2 * world)
        table = torch.arange(2 * world, dtype=torch.int32, device=DEV)[None]
        paged = timed_reps(lambda: torch.ops.attn.prefill(
            q, k.view(-1, c, HKV, D), v.view(-1, c, HKV, D), cu, cu, s, s, scale, True, table),
            args.reps, solo=True)
        rows.append(dict(seq_len=s, ranks=1, method="one GPU, paged", ms=paged,
                         tflops=flops / paged / 1e9, speedup=one / paged, note=""))
        mine = [shard_sequence(t, world, rank).contiguous() for t in (q, k, v)]
        expected = shard_sequence(torch.ops.attn.prefill(q, k, v, cu, cu, s, s, scale, True),
                                  world, rank).float()
        del q, k, v
        for method in args.methods:
            slow = _lse_backend(mine[0], mine[1]) if method == "ring" else None
            if slow is not None and DEV != "cpu":
                rows.append(dict(seq_len=s, ranks=world, method=method, ms=None, tflops=None,
                                 speedup=None, note=slow))
                continue
            try:
                ms = timed_reps(lambda: context_parallel_prefill(*mine, scale, method=method),
                                args.reps)
                # Not a test (the examples are), but a wrong fast result should not go unseen.
                got = context_parallel_prefill(*mine, scale, method=method).float()
                err = torch.tensor([(got - expected).abs().max() / expected.abs().max()],
                                   device=DEV)
                dist.all_reduce(err, op=dist.ReduceOp.MAX)
                rows.append(dict(seq_len=s, ranks=world, method=method, ms=ms,
                                 tflops=flops / ms / 1e9, speedup=one / ms,
                                 note=f"max rel err vs one GPU {err.item():.2g}"))
            except Exception as e:  # e.g. out of memory: reported, not fatal
                rows.append(dict(seq_len=s, ranks=world, method=method, ms=None, tflops=None,
                                 speedup=None, note=f"{type(e).__name__}: {e}"[:160]))
            if rank == 0:
                print(rows[-1], flush=True)
        del mine, expected
        torch.cuda.empty_cache()


def _lse_backend(q, k) -> str | None:
    """Why the ring is not timed here (its prefill_with_lse would run on the pure-torch
    reference, O(S^2) memory), or None when a kernel backend serves it."""
    from attn_ops import contract, registry
    name = registry.select(contract.prefill_config(q, k, False, with_lse=True)).name
    if name in ("reference", "sdpa"):
        return f"not timed: prefill_with_lse runs on the {name} backend on this device"
    return None


def _decode_step(model, cache, batch, tokens, tp: bool):
    from torch.distributed.tensor.experimental import implicit_replication
    if not tp:
        return lambda: model.decode(tokens, cache, batch)

    def step():
        with implicit_replication():
            return model.decode(tokens, cache, batch)
    return step


def _tp_case(model, mesh, cfg, b: int, ctx: int, tp: bool):
    """A decode step of ``b`` sequences with ``ctx`` cached tokens each (planned, not computed)."""
    bs = 16
    blocks = b * -(-(ctx + 1) // bs)
    if tp:
        cache = HeadShardedKVCache(mesh, blocks, bs, HKV, D, max_seq_len=ctx + 1,
                                   num_layers=cfg.num_layers, dtype=torch.bfloat16, device=DEV)
    else:
        cache = model.new_cache(blocks, bs, ctx + 1)
    cache.prepare_prefill({i: ctx for i in range(b)})  # plan only: the contents stay random
    batch = cache.prepare_decode(range(b))
    tokens = torch.randint(cfg.vocab_size, (b,), device=DEV)
    return cache, _decode_step(model, cache, batch, tokens, tp)


def bench_tensor_parallel(args, rows: list) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    if not args.tp_batch:
        return
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh(DEV, (world,))
    big = DEV != "cpu"
    cfg = DemoConfig(vocab_size=32000 if big else 320, hidden_size=H * D,
                     num_layers=args.tp_layers, num_heads=H, num_kv_heads=HKV,
                     intermediate_size=14336 if big else 2 * H * D)
    for tp in (False, True):
        if tp or rank == 0:
            model = DemoLlama(cfg, seed=0).to(DEV, torch.bfloat16)
            if tp:
                model = parallelize_module(model, mesh, llama_tp_plan(cfg.num_layers))
            for b in args.tp_batch:
                cache, fn = _tp_case(model, mesh, cfg, b, args.tp_context, tp)
                for mode in ("eager",) if DEV == "cpu" else ("eager", "graph"):
                    note = ""
                    try:
                        ms = _median_local(fn if mode == "eager" else captured(fn), 30)
                    except Exception as e:  # reported, not fatal
                        ms, note = None, f"{type(e).__name__}: {e}"[:160]
                    rows.append(dict(batch=b, context=args.tp_context, layers=cfg.num_layers,
                                     ranks=world if tp else 1, mode=mode, ms=ms, note=note))
                    if rank == 0:
                        print(rows[-1], flush=True)
                del cache, fn
            del model
            torch.cuda.empty_cache()
        dist.barrier()
    by = {(r["batch"], r["mode"], r["ranks"]): r["ms"] for r in rows}
    for r in rows:
        one = by.get((r["batch"], r["mode"], 1))
        r["speedup"] = one / r["ms"] if one and r["ms"] else None


def _median_local(run, reps: int) -> float:
    """Median ms of ``reps`` back-to-back calls on this rank (collectives keep ranks in step)."""
    for _ in range(3):
        run()
    return statistics.median(time_once(run) for _ in range(reps))


def write(path: Path, rows: list) -> None:
    if rows:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def main() -> int:
    args = parse_args()
    global DEV, H, HKV, D
    if args.smoke:
        DEV, H, HKV, D = "cpu", 4, 2, 16
        args.seq_lens, args.tp_batch, args.tp_context, args.reps = [248], [3], 40, 2
    init_from_env(DEV)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with torch.inference_mode():
            cp_rows, tp_rows = [], []
            bench_context_parallel(args, cp_rows)
            if dist.get_rank() == 0:
                write(out / "distributed_cp.csv", cp_rows)
            bench_tensor_parallel(args, tp_rows)
            if dist.get_rank() == 0:
                write(out / "distributed_tp.csv", tp_rows)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
