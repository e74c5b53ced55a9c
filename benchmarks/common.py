"""Benchmark plumbing shared by bench_*.py: timing, ceilings measured in the same run, CSV, tables.

Every figure is a median of CUDA-event timings (``triton.testing.do_bench``, which also flushes
the L2 between repetitions, so each call reads its working set from HBM). Ceilings (device copy
bandwidth, bf16 matmul rate) are measured in the same process so results are ratios within one
run, not against numbers from another day. ``--smoke`` runs tiny shapes on the CPU (Triton
interpreter, wall-clock timer) to check the scripts themselves; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/bench_x.py` from a checkout
    sys.path.insert(0, str(ROOT))


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=os.environ.get("ATTN_BENCH_OUT",
                                                        str(ROOT / "benchmarks" / "results")),
                        help="folder for the CSV files (default benchmarks/results)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU through the Triton interpreter "
                             "(checks the script)")
    parser.add_argument("--tune", action="store_true",
                        help="also sweep our kernel's launch configs on the target shapes")
    parser.add_argument("--tune-only", action="store_true", help="only the sweep of --tune")
    if extra:
        extra(parser)
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("ATTN_OPS_CHECK", "0")  # data checks sync the host: off when timing
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def device(args) -> torch.device:
    return torch.device("cpu" if args.smoke else "cuda")


def bench_ms(fn: Callable[[], object], smoke: bool = False, warmup_ms: int = 25,
             rep_ms: int = 100, graph: bool = False) -> float:
    """Median milliseconds per call of ``fn``.

    Eager (default): ``triton.testing.do_bench`` (the method: docs/measuring.md): CUDA events
    around each call, the L2 flushed before it by writing 256 MB of zeros. When the host takes
    longer to issue a call than the device takes to run it, this includes host time.

    ``graph``: the call is captured once in a CUDA graph and its replays are timed, the L2
    flushed before each by *reading* 256 MB (clean lines). Device time only, and without the
    ~15 us the next kernel spends writing back the ~50 MB of dirty lines a zero-write flush
    leaves in the L2 (measured on the H100: it is the whole gap between 1-GiB copies at
    3.0 TB/s and a 134 MB decode read at 2.0 TB/s under do_bench).
    """
    if smoke:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    if graph:
        return _median_ms(captured(fn), warmup_ms, rep_ms)
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def captured(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph (after a warm-up on a side stream); returns replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@functools.lru_cache(maxsize=None)
def _flush_buffer() -> torch.Tensor:
    return torch.randint(0, 1 << 30, (64 << 20,), dtype=torch.int32, device="cuda")  # 256 MB


def _median_ms(fn: Callable[[], object], warmup_ms: int, rep_ms: int) -> float:
    flush = _flush_buffer()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.accelerator.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    reps = min(1000, max(10, int(rep_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.sum()  # evict the L2 by reading: no dirty lines left behind
        starts[i].record()
        fn()
        ends[i].record()
    torch.accelerator.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


@functools.lru_cache(maxsize=None)
def copy_gbs(smoke: bool = False) -> float:
    """Device-to-device copy bandwidth, GB/s counting bytes read + written (1 GiB buffers)."""
    n = (1 << 20) if smoke else (1 << 28)  # fp32 elements: 1 GiB on the GPU
    src = torch.randn(n, device="cpu" if smoke else "cuda")
    dst = torch.empty_like(src)
    # Eager on purpose: captured in a graph the copy becomes a memcpy node served by the copy
    # engines (2.44 TB/s on the H100), not by the SMs (3.0 TB/s, as every kernel here reads).
    # At 1 GiB the L2 flush method does not matter (50 MB of 2 GB moved).
    ms = bench_ms(lambda: dst.copy_(src), smoke)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


@functools.lru_cache(maxsize=None)
def matmul_tflops(smoke: bool = False) -> float:
    """bf16 8192^3 matmul rate, TFLOP/s (the tensor-core ceiling of this run)."""
    n = 256 if smoke else 8192
    dev = "cpu" if smoke else "cuda"
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b, smoke)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def environment() -> dict[str, str]:
    import triton
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sms=str(props.multi_processor_count),
                    cuda=str(torch.version.cuda))
    else:
        info.update(device="cpu (smoke)")
    return info


def try_time(fn_factory: Callable[[], Callable[[], object]], smoke: bool,
             graph: bool = False, **bench_kw) -> tuple[float | None, str]:
    """Build a contender (may raise: not installed / unsupported) and time it, eagerly or
    (``graph``) as CUDA-graph replays. Returns (ms, "") or (None, reason)."""
    try:
        fn = fn_factory()
        return bench_ms(fn, smoke, graph=graph and not smoke, **bench_kw), ""
    except Exception as e:  # a contender that cannot run here is reported, not fatal
        msg = f"{type(e).__name__}: {e}".splitlines()[0]
        return None, msg[:160]


def try_time_both(fn_factory, smoke: bool) -> tuple[float | None, float | None, str]:
    """(eager ms, graph-replay ms, reason) for one contender (see :func:`bench_ms`); the
    factory runs once."""
    built, err = [], ""
    try:
        built.append(fn_factory())
    except Exception as e:
        err = f"{type(e).__name__}: {e}".splitlines()[0][:160]
        return None, None, err
    eager, err = try_time(lambda: built[0], smoke)
    graph, gerr = try_time(lambda: built[0], smoke, graph=True)
    return eager, graph, err or (f"graph: {gerr}" if gerr else "")


def time_contender(factory, smoke: bool, graph: bool = True
                   ) -> tuple[float | None, float | None, str]:
    """Time a contender whose factory returns ``(callable, note)``.

    Returns (eager ms, graph-replay ms or None, note and/or the reason it could not run)."""
    notes = []

    def build():
        fn, note = factory()
        notes.append(note)
        return fn
    if graph:
        eager, replay, err = try_time_both(build, smoke)
    else:
        (eager, err), replay = try_time(build, smoke), None
    return eager, replay, "; ".join(x for x in (notes[0] if notes else "", err) if x)


def write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
        return str(v)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    sys.stdout.flush()


def header(title: str, smoke: bool) -> dict[str, str]:
    env = environment()
    print(f"== {title} | {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"{env['date']}")
    return env
