"""Host overhead per attention call, every path side by side: eager, torch.compile'd, CUDA graph.

Tiny shapes, so the GPU work (a few us) hides behind the host. Sections:

* ``eager``: ``host_us`` is the wall time of CALLS back-to-back calls divided by CALLS, before
  the final synchronize, the least of three timings interleaved with the other rows (launches
  are asynchronous: where ``gpu_us`` is below it the queue never fills; where it is above, the
  queue fills and ``host_us`` reads the GPU time); ``gpu_us`` the device time of one call
  (do_bench). Our op path (``torch.ops.attn.*``, ``attn_ops.*`` with
  ``backend=``), the Triton kernel wrapper alone, with its launch bound (the compiled launcher
  called directly, attn_ops/backends/triton/launch.py) and through Triton's own
  ``kernel[grid]`` path, beside torch calls of similar size; on an sm90 GPU the bound decode of
  16 sequences on the Gluon Hopper decode route and on the Triton kernels, and the Hopper
  prefill route (2 x 256 prompts: the guarded Gluon kernel and its fixup launch), through the
  op and bound alone. The op and bound rows run twice, ``launcher`` ``Python`` (before: prepared
  launches call ``CompiledKernel.run``, Triton's Python wrapper of the launcher) and ``C``
  (after: attn_ops/backends/triton/raw_launch.py calls the launcher's C function).
* ``chain``: a torch.compile'd function of 32 decode calls, each feeding the next, per call:
  ``attn_ops`` backend with Triton inlined (Inductor launches our kernels), the same with the
  attn ops kept as extern calls (``attn_ops.inline_triton=False``), and 32 SDPA calls compiled by
  Inductor.
* ``graph``: the same 32-call chains captured in one CUDA graph, per call.
* ``--cpu-op-path`` (no GPU needed): the op path above the backend function, with a no-op backend
  registered in the registry, 20000 calls, 7 runs: median and range of the wall time and of the
  process CPU time (the development machine is shared: CPU time is the steadier figure).
* ``--cpu-defaults`` (no GPU needed): the default CPU store and decode through the op beside
  the torch calls they replace (two ``index_copy_``; F.scaled_dot_product_attention on the dense
  cache slice), one thread, interleaved runs, medians (:func:`cpu_defaults`).
* ``--cpu-triton-path`` (no GPU needed): the Triton backend's host path on CPU tensors, every
  kernel replaced by a stand-in whose compiled launcher does nothing, so launch.py takes the
  direct path of a compiled kernel: the op path and the backend's bound function alone (what
  the op path's memo calls), 5000 calls, 7 runs, same statistics.
* ``--hopper-parts`` (an sm90 GPU): where the Hopper route's eager host time goes, 2 x 256
  prompts, 8 / 2 heads: the op, the bound function, each compiled launcher's C function alone
  (called with the arguments a bound call passed it), both, and the allocations and lookups a
  call makes; the same for the Gluon decode route, 16 sequences; two rounds, the least of five
  timings each.

The CPU sections live in overhead_cpu.py, the Hopper parts in overhead_hopper.py, the timing
and inputs they share in overhead_common.py.

    python benchmarks/bench_overhead.py [--out DIR] [--profile] [--cpu-op-path]
                                        [--cpu-triton-path] [--cpu-defaults] [--hopper-parts]
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from common import bench_ms, device, header, parse_args, print_table, write_csv
from overhead_common import CALLS, bound_decode_routes, host_us, tiny_inputs

CHAIN = 32


def _unbound(fn):
    """``fn`` with every Triton launch through ``kernel[grid]`` (Triton's own run path)."""
    from attn_ops.backends.triton import launch

    def run():
        launch.enabled = False
        try:
            return fn()
        finally:
            launch.enabled = True
    return run


def eager_cases(dev):
    import attn_ops
    from attn_ops.backends.triton import decode_kernel, prefill_kernel, store_kernel
    t = tiny_inputs(dev)
    ops = torch.ops.attn
    store_w = lambda: store_kernel.store_kvcache(t.key, t.key, t.k_cache, t.v_cache, t.slots)
    decode_w = lambda: decode_kernel.decode(t.q1, t.k_cache, t.v_cache, t.seqlens, t.table, 0.08)
    prefill_w = lambda: prefill_kernel.prefill(t.qp, t.kp, t.kp, t.cu, t.cu, 16, 16, 0.08)
    return {
        "store_kvcache": {
            "attn_ops.store_kvcache(backend='triton')": lambda: attn_ops.store_kvcache(
                t.key, t.key, t.k_cache, t.v_cache, t.slots, backend="triton"),
            "torch.ops.attn.store_kvcache (env choice)": lambda: ops.store_kvcache(
                t.key, t.key, t.k_cache, t.v_cache, t.slots),
            "kernel wrapper, launch bound": store_w,
            "kernel wrapper, Triton's kernel[grid]": _unbound(store_w),
            "torch index_copy_ x2": lambda: (t.k_flat.index_copy_(0, t.slots, t.key),
                                             t.k_flat.index_copy_(0, t.slots, t.key)),
        },
        "decode": {
            "attn_ops.decode(backend='triton')": lambda: attn_ops.decode(
                t.q1, t.k_cache, t.v_cache, t.seqlens, t.table, 0.08, backend="triton"),
            "torch.ops.attn.decode (env choice)": lambda: ops.decode(
                t.q1, t.k_cache, t.v_cache, t.seqlens, t.table, 0.08),
            "kernel wrapper, launch bound": decode_w,
            "kernel wrapper, Triton's kernel[grid]": _unbound(decode_w),
            "F.scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(
                t.qd, t.kd, t.kd, enable_gqa=True),
            **_decode_routes(t),
        },
        "prefill": {
            "attn_ops.prefill(backend='triton')": lambda: attn_ops.prefill(
                t.qp, t.kp, t.kp, t.cu, t.cu, 16, 16, 0.08, backend="triton"),
            "torch.ops.attn.prefill (env choice)": lambda: ops.prefill(
                t.qp, t.kp, t.kp, t.cu, t.cu, 16, 16, 0.08),
            "kernel wrapper, launch bound": prefill_w,
            "kernel wrapper, Triton's kernel[grid]": _unbound(prefill_w),
            **_fa3_cases(t),
            **_hopper_cases(t),
        },
    }


def _decode_routes(t) -> dict:
    """The bound decode of 16 sequences on the Gluon Hopper route and on the Triton kernels
    (overhead_common.bound_decode_routes), where the device puts it on the route."""
    routes = bound_decode_routes(t.q1.device)
    if routes is None:
        return {}
    args, gluon, triton_kernels = routes
    return {"bound decode B 16, Gluon Hopper route": lambda: gluon(*args),
            "bound decode B 16, Triton kernels": lambda: triton_kernels(*args)}


def _hopper_cases(t) -> dict:
    """The Hopper route (the guarded Gluon kernel and its fixup: two launches) on 2 x 256
    prompts, through the op and bound alone, on an sm90 GPU."""
    from attn_ops.backends import triton as tb
    from attn_ops.backends.triton import hopper_prefill_launch as hopper
    args = (t.qh, t.kh, t.vh, t.cuh, t.cuh, 256, 256, 0.08, True)
    if tb.prefill_route(t.qh, t.kh, t.cuh, 256) != "hopper":
        return {}
    run = None

    def bound():
        nonlocal run
        if run is None:  # bound on the first call (after main has chosen raw_launch or not)
            run = hopper.bind_prefill_guarded(*args)
        return run(*args)
    return {
        "torch.ops.attn.prefill, Hopper route, 2 x 256, 8 / 2 heads": lambda: (
            torch.ops.attn.prefill(*args)),
        "Hopper route bound (bind_prefill_guarded), 2 x 256, 8 / 2 heads": bound,
    }


def _fa3_cases(t) -> dict:
    """The flash backend on FA3 beside FA3's own varlen call (PyPI fa3-fwd), when installed."""
    try:
        import fa3_fwd_interface as fa3
    except ImportError:
        return {}
    import attn_ops
    return {
        "attn_ops.prefill(backend='flash')": lambda: attn_ops.prefill(
            t.qp, t.kp, t.kp, t.cu, t.cu, 16, 16, 0.08, backend="flash"),
        "fa3-fwd flash_attn_varlen_func (direct)": lambda: fa3.flash_attn_varlen_func(
            t.qp, t.kp, t.kp, t.cu, t.cu, 16, 16, softmax_scale=0.08, causal=True),
    }


def _chain_fns(t):
    def ours(q, k_cache, v_cache, seqlens, table):
        for _ in range(CHAIN):
            q = torch.ops.attn.decode(q, k_cache, v_cache, seqlens, table, 0.08)
        return q

    def sdpa(q, k):
        for _ in range(CHAIN):
            q = F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
        return q
    return ours, sdpa


def chain_cases(dev):
    """name -> (per-call host-time function, the same chain for graph capture)."""
    import functools

    import attn_ops
    from graph_passes import attn_ops_backend  # the function, should the entry point be absent
    t = tiny_inputs(dev)
    ours, sdpa = _chain_fns(t)
    args = (t.q1, t.k_cache, t.v_cache, t.seqlens, t.table)
    inline = torch.compile(ours, backend=attn_ops_backend)
    extern = torch.compile(ours, backend=functools.partial(
        attn_ops_backend, options={"attn_ops.inline_triton": False}))
    plain = torch.compile(sdpa)

    def under_triton(fn, *a):
        def run():
            with attn_ops.use_backend("triton"):
                return fn(*a)
        return run
    return {
        "attn_ops backend, Triton inlined (32 decode)": under_triton(inline, *args),
        "attn_ops backend, attn ops extern (32 decode)": under_triton(extern, *args),
        "eager attn ops (32 decode)": under_triton(ours, *args),
        "inductor, 32 F.sdpa": lambda: plain(t.qd, t.kd),
        "eager, 32 F.sdpa": lambda: sdpa(t.qd, t.kd),
    }


def graph_us(fn, reps: int = 200) -> float:
    """Per-replay wall time of ``fn`` captured in a CUDA graph (device-bound: host ~5 us)."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


def profile(paths: dict, calls: int) -> None:
    """Print where the host time of each path goes (cProfile, top functions by own time)."""
    import cProfile
    import pstats
    for name, fn in paths.items():
        fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        print(f"--- profile: {name} ({calls} calls)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def main():
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--profile", action="store_true", help="also cProfile the eager paths"),
        p.add_argument("--cpu-op-path", action="store_true",
                       help="only the op path above a no-op backend, on the CPU"),
        p.add_argument("--cpu-defaults", action="store_true",
                       help="only the default CPU store and decode beside the torch calls they "
                            "replace, one thread"),
        p.add_argument("--cpu-triton-path", action="store_true",
                       help="only the Triton backend's host path with no-op launches, on the "
                            "CPU"),
        p.add_argument("--hopper-parts", action="store_true",
                       help="only the Hopper route's host time taken apart (an sm90 GPU)")))
    env = header("host overhead", args.smoke)
    if args.cpu_defaults:
        from overhead_cpu import cpu_defaults
        rows = [dict(r, date=env["date"], torch=env["torch"]) for r in cpu_defaults()]
        write_csv(args.out / "overhead_cpu_defaults.csv", rows)
        print_table(rows, ["shape", "path", "cpu_median", "cpu_min", "cpu_max", "wall_median",
                           "cpu_vs_last"])
        return
    if args.cpu_triton_path:
        from overhead_cpu import cpu_triton_path
        rows = [dict(r, date=env["date"], torch=env["torch"]) for r in cpu_triton_path()]
        write_csv(args.out / "overhead_cpu_triton_path.csv", rows)
        print_table(rows, ["path", "wall_median", "wall_min", "wall_max", "cpu_median",
                           "cpu_min", "cpu_max"])
        return
    if args.cpu_op_path:
        from overhead_cpu import cpu_op_path
        rows = [dict(r, date=env["date"], torch=env["torch"]) for r in cpu_op_path()]
        write_csv(args.out / "overhead_cpu_op_path.csv", rows)
        print_table(rows, ["path", "wall_median", "wall_min", "wall_max", "cpu_median",
                           "cpu_min", "cpu_max"])
        return
    if args.hopper_parts:
        os.environ["ATTN_OPS_BACKEND"] = "triton"
        from attn_ops.backends import triton as tb
        from overhead_hopper import hopper_parts
        tb._HOPPER_EAGER_MIN_WORK = 0  # the 2 x 256 prompts take the route (see below)
        rows = [dict(r, device=env["device"], date=env["date"], torch=env["torch"])
                for r in hopper_parts(device(args), 20 if args.smoke else CALLS)]
        write_csv(args.out / "overhead_hopper_parts.csv", rows)
        print_table(rows, ["part", "host_us", "rounds"])
        return
    os.environ["ATTN_OPS_BACKEND"] = "triton"  # for the torch.ops.attn.* rows
    from attn_ops import registry
    from attn_ops.backends import triton as tb
    from attn_ops.backends.triton import launch
    # The Hopper rows' 2 x 256 prompts are below the eager work threshold: lifted so that they
    # take the route (the other rows' shapes are not on it).
    tb._HOPPER_EAGER_MIN_WORK = 0
    dev = device(args)
    calls = 20 if args.smoke else CALLS
    rows = []
    # Before (prepared launches through the launcher's Python wrapper, CompiledKernel.run) and
    # after (raw_launch: its C function), the op and bound rows only, interleaved row by row
    # (host time drifts by 10-20% over a run on a shared host); each switch binds afresh.
    modes = (True,) if args.smoke else (False, True)
    cases = {raw: eager_cases(dev) for raw in modes}
    timed: dict[tuple, list] = {}

    def use(raw: bool) -> None:
        launch.raw = raw
        registry.clear_cache()
        launch.clear()
    for _ in range(1 if args.smoke else 3):
        for op, paths in cases[True].items():
            for path in paths:
                for raw in modes:
                    if raw or path.startswith("torch.ops") or "bound" in path:
                        use(raw)
                        timed.setdefault((op, path, raw), []).append(
                            host_us(cases[raw][op][path], calls, not args.smoke, 1))
    for (op, path, raw), hosts in timed.items():
        use(raw)
        rows.append(dict(bench="eager", op=op, launcher="C" if raw else "Python", path=path,
                         host_us=min(hosts),
                         gpu_us=bench_ms(cases[raw][op][path], args.smoke) * 1e3))
    if not args.smoke:
        for path, fn in chain_cases(dev).items():
            try:  # one path failing (a compile error) leaves the others measured
                host = host_us(fn, calls // 20, True) / CHAIN
                graph = graph_us(fn) / CHAIN
            except Exception as e:  # noqa: BLE001 (reported in the table)
                print(f"{path}: {type(e).__name__}: {str(e)[:300]}")
                host = graph = float("nan")
            rows.append(dict(bench="chain", op="decode x32", path=path, host_us=host,
                             gpu_us=graph))
    for r in rows:
        r.update(device=env["device"], date=env["date"], torch=env["torch"],
                 triton=env["triton"])
    write_csv(args.out / "overhead.csv", rows)
    print_table(rows, ["bench", "op", "launcher", "path", "host_us", "gpu_us"])
    if args.profile:
        cases = eager_cases(dev)
        profile({f"{op}: {path}": cases[op][path] for op in ("store_kvcache", "decode")
                 for path in list(cases[op])[:3]}, calls)


if __name__ == "__main__":
    main()
