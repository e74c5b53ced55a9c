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
  call makes (:func:`hopper_parts`); the same for the Gluon decode route, 16 sequences
  (:func:`_decode_parts`); two rounds, the least of five timings each.

    python benchmarks/bench_overhead.py [--out DIR] [--profile] [--cpu-op-path]
                                        [--cpu-triton-path] [--cpu-defaults] [--hopper-parts]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

from common import bench_ms, device, header, parse_args, print_table, write_csv

CALLS = 2000
CHAIN = 32


def host_us(fn, calls: int, sync: bool, repeats: int = 3) -> float:
    """The least of ``repeats`` timings of ``calls`` back-to-back calls, per call (host time
    on a shared machine only grows with interference: the least is the steadiest)."""
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if sync:
            torch.accelerator.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - start)
        if sync:
            torch.accelerator.synchronize()
    return best / calls * 1e6


def _inputs(dev, b=1):
    hkv, h, d, page = 8, 32, 128, 16
    bf = torch.bfloat16
    t = types.SimpleNamespace()
    t.k_cache = torch.randn(4 * b, page, hkv, d, device=dev, dtype=bf)
    t.v_cache = torch.randn_like(t.k_cache)
    t.key = torch.randn(b, hkv, d, device=dev, dtype=bf)
    t.slots = torch.arange(b, device=dev) * 4 * page + 5
    t.q1 = torch.randn(b, h, d, device=dev, dtype=bf)
    t.seqlens = torch.full((b,), 16, dtype=torch.int32, device=dev)
    t.table = (torch.arange(b, dtype=torch.int32, device=dev) * 4 + 2)[:, None].contiguous()
    t.qp = torch.randn(16, h, d, device=dev, dtype=bf)
    t.kp = torch.randn(16, hkv, d, device=dev, dtype=bf)
    t.cu = torch.tensor([0, 16], dtype=torch.int32, device=dev)
    t.qd = t.q1.view(b, h, 1, d)
    t.kd = t.k_cache.view(b, 4, page, hkv, d)[:, 2].transpose(1, 2)  # [b, Hkv, 16, D]
    t.k_flat = t.k_cache.view(-1, hkv, d)
    # 2 x 256 prompts, 8 / 2 heads (GPU time below the host's): the Hopper route's launches
    # (sm90), eager threshold lifted (see main)
    t.qh = torch.randn(512, 8, d, device=dev, dtype=bf)
    t.kh, t.vh = (torch.randn(512, 2, d, device=dev, dtype=bf) for _ in range(2))
    t.cuh = torch.tensor([0, 256, 512], dtype=torch.int32, device=dev)
    return t


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
    t = _inputs(dev)
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
    """The Triton backend's bound decode (what the op path's memo calls) on each of its
    routes for a bf16 decode of 16 sequences of 16 keys (128 (sequence, KV head) pairs, which
    the Gluon Hopper decode takes on an H100 / H200: decode_plan.HOPPER_DECODE): the Gluon
    launch, and the Triton kernels' (the route off while binding)."""
    from attn_ops.backends.triton import decode_kernel, decode_plan
    u = _inputs(t.q1.device, b=16)
    args = (u.q1, u.k_cache, u.v_cache, u.seqlens, u.table, 0.08)
    if not decode_kernel.hopper_route(u.q1, u.k_cache, u.v_cache, u.table):
        return {}
    gluon = decode_kernel.bind_decode(*args)
    decode_plan.HOPPER_DECODE = False
    try:
        triton_kernels = decode_kernel.bind_decode(*args)
    finally:
        decode_plan.HOPPER_DECODE = True
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
    t = _inputs(dev)
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


def cpu_op_path(runs: int = 7, calls: int = 20000) -> list[dict]:
    """The op path above the backend function: a no-op backend, 20000 calls, 7 runs."""
    import attn_ops
    from attn_ops import registry
    noop = types.ModuleType("attn_ops_bench_noop")
    noop.name = "noop"
    noop.supports = lambda config: None
    noop.prefill = noop.decode = lambda q, *a, **k: q
    noop.store_kvcache = lambda *a, **k: None
    sys.modules[noop.__name__] = noop
    registry.BACKENDS["noop"] = noop.__name__
    os.environ["ATTN_OPS_BACKEND"] = "noop"
    os.environ["ATTN_OPS_CHECK"] = "0"
    t = _inputs("cpu")
    ops = torch.ops.attn
    paths = {
        "torch.ops.attn.store_kvcache": lambda: ops.store_kvcache(t.key, t.key, t.k_cache,
                                                                  t.v_cache, t.slots),
        "torch.ops.attn.decode": lambda: ops.decode(t.q1, t.k_cache, t.v_cache, t.seqlens,
                                                    t.table, 0.08),
        "torch.ops.attn.prefill": lambda: ops.prefill(t.qp, t.kp, t.kp, t.cu, t.cu, 16, 16, 0.08),
        "attn_ops.decode(backend='noop')": lambda: attn_ops.decode(
            t.q1, t.k_cache, t.v_cache, t.seqlens, t.table, 0.08, backend="noop"),
        "torch.ops.attn.decode, inference_mode": lambda: _inference(
            lambda: ops.decode(t.q1, t.k_cache, t.v_cache, t.seqlens, t.table, 0.08)),
    }
    return _time_paths(paths, runs, calls, "cpu_op_path")


class _NoopCompiled:
    """A compiled kernel whose launcher does nothing (the C launch left out of the timing)."""
    function = packed_metadata = None

    @staticmethod
    def run(*args):
        return None


class _NoopKernel:
    """A stand-in for a kernel's JITFunction: its ``run`` (Triton's path) returns
    :class:`_NoopCompiled`, so launch.py pins it and every later launch takes the direct path
    of a compiled kernel, with the no-op launcher."""

    def __init__(self, real):
        from triton.runtime.jit import JITFunction
        self.params = JITFunction(getattr(real, "fn", real)).params
        self.device_caches = {}

    def run(self, *args, grid, warmup, **kwargs):
        return _NoopCompiled()


def _mock_triton_launches():
    """Point the Triton backend's kernels at no-op launchers (CPU, interpreter mode): the op
    path and the kernel wrappers run all their Python, the launch path of a compiled kernel
    included, up to the C launcher."""
    from attn_ops.backends.triton import (decode_kernel, launch, prefill_kernel, store_kernel,
                                          unified_kernel)
    from attn_ops.backends import triton as backend
    for module, name in ((store_kernel, "_store_kvcache_kernel"),
                         (decode_kernel, "_decode_split_kernel"),
                         (decode_kernel, "merge_splits_kernel"),
                         (prefill_kernel, "_prefill_kernel"),
                         (unified_kernel, "_unified_kernel"), (unified_kernel, "_merge_kernel")):
        setattr(module, name, _NoopKernel(getattr(module, name)))
    hooks = types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    launch._driver = (lambda: 0, lambda device: 0, hooks)
    if not hasattr(launch, "prepare"):  # the tree before per-signature plans: bind as on CUDA
        backend.bind = lambda config: launch.bind_signature(getattr(backend, config.op))
    return backend


def cpu_triton_path(runs: int = 7, calls: int = 5000) -> list[dict]:
    """The Triton backend's host path on the CPU with every launch a no-op (see
    :func:`_mock_triton_launches`): the op path, and the backend's bound function alone."""
    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors: the backend accepts them
    os.environ["ATTN_OPS_BACKEND"] = "triton"
    os.environ["ATTN_OPS_CHECK"] = "0"
    from attn_ops import contract
    backend = _mock_triton_launches()
    t = _inputs("cpu")
    ops = torch.ops.attn
    store = (t.key, t.key, t.k_cache, t.v_cache, t.slots)
    dec = (t.q1, t.k_cache, t.v_cache, t.seqlens, t.table, 0.08)
    pre = (t.qp, t.kp, t.kp, t.cu, t.cu, 16, 16, 0.08)
    # What the op path's memo calls: bind_args(config, args) with every positional argument of
    # the op (the tree before it: bind(config) with the arguments given above).
    full = {"store_kvcache": store + (None, None), "decode": dec + (-1, 0.0, None, None, None),
            "prefill": pre + (True, None, -1, 0.0, None, None, None)}
    bind_args = getattr(backend, "bind_args", None)
    given = full if bind_args is not None else {"store_kvcache": store, "decode": dec,
                                                 "prefill": pre}
    bound = {op: bind_args(cfg, full[op]) if bind_args is not None else backend.bind(cfg)
             for op, cfg in (
                 ("store_kvcache", contract.store_config(t.key, t.k_cache, t.slots)),
                 ("decode", contract.decode_config(t.q1, t.k_cache)),
                 ("prefill", contract.prefill_config(t.qp, t.kp)))}
    paths = {
        "torch.ops.attn.store_kvcache (triton, no-op launch)": lambda: ops.store_kvcache(*store),
        "torch.ops.attn.decode (triton, no-op launch)": lambda: ops.decode(*dec),
        "torch.ops.attn.prefill (triton, no-op launch)": lambda: ops.prefill(*pre),
        "triton bound function: store_kvcache": lambda: bound["store_kvcache"](
            *given["store_kvcache"]),
        "triton bound function: decode": lambda: bound["decode"](*given["decode"]),
        "triton bound function: prefill": lambda: bound["prefill"](*given["prefill"]),
    }
    return _time_paths(paths, runs, calls, "cpu_triton_path")


def _time_paths(paths: dict, runs: int, calls: int, bench: str) -> list[dict]:
    rows = []
    for name, fn in paths.items():
        for _ in range(500):
            fn()
        wall, cpu = [], []
        for _ in range(runs):
            w, c = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fn()
            wall.append((time.perf_counter() - w) / calls * 1e6)
            cpu.append((time.process_time() - c) / calls * 1e6)
        rows.append(dict(bench=bench, path=name, wall_median=statistics.median(wall),
                         wall_min=min(wall), wall_max=max(wall),
                         cpu_median=statistics.median(cpu), cpu_min=min(cpu), cpu_max=max(cpu)))
    return rows


def hopper_parts(dev, calls: int = CALLS, rounds: int = 2) -> list[dict]:
    """The Hopper route's eager host time taken apart (see the module docstring)."""
    from attn_ops.backends import triton as tb
    from attn_ops.backends.triton import hopper_prefill_launch as hopper
    from attn_ops.backends.triton import launch, raw_launch, split_counters
    t = _inputs(dev)
    args = (t.qh, t.kh, t.vh, t.cuh, t.cuh, 256, 256, 0.08, True)
    if tb.prefill_route(t.qh, t.kh, t.cuh, 256) != "hopper":
        raise SystemExit("--hopper-parts needs an sm90 GPU (the Hopper route)")
    fires = []
    build = raw_launch.build
    raw_launch.build = lambda *a, **k: fires.append(build(*a, **k)) or fires[-1]
    try:
        run = hopper.bind_prefill_guarded(*args)
        run(*args)  # pins both launches: fires[0] the Gluon kernel's, fires[1] the fixup's
    finally:
        raw_launch.build = build
    if len(fires) != 2 or None in fires:
        raise SystemExit("--hopper-parts: raw_launch does not serve this Triton's launchers")
    # The C function's arguments, recorded from one bound call (its output kept alive)
    recorded, c_launch = {}, {}
    for name, fire in zip(("Gluon kernel", "fixup"), fires):
        real = c_launch[name] = fire.__globals__["launch"]
        fire.__globals__["launch"] = lambda *a, name=name, real=real: (
            recorded.__setitem__(name, a), real(*a))
    out = run(*args)
    for name, fire in zip(c_launch, fires):
        fire.__globals__["launch"] = c_launch[name]
    get_device, get_stream = launch._runtime()[:2]
    qdev = t.qh.device  # with its index, as the route's calls pass it
    parts = {
        "torch.ops.attn.prefill, Hopper route": lambda: torch.ops.attn.prefill(*args),
        "the bound function (bind_prefill_guarded)": lambda: run(*args),
        **{f"C launch function alone: {name} ({len(recorded[name])} arguments)":
           (lambda a=recorded[name], f=c_launch[name]: f(*a)) for name in c_launch},
        "both C launch functions": lambda: [f(*recorded[n]) for n, f in c_launch.items()],
        "torch.empty_like(q) (the output)": lambda: torch.empty_like(t.qh),
        "split_counters.scratch (the flags)": lambda: split_counters.scratch(4096, qdev),
        "current device + stream": lambda: (get_device(), get_stream(qdev.index)),
        "12 x Tensor.data_ptr()": lambda: [x.data_ptr() for x in (
            t.qh, t.kh, t.vh, out, t.cuh, t.cuh, t.cuh, t.qh, t.qh, t.qh, t.qh, t.cuh)],
    }
    parts.update(_decode_parts(dev))
    timed: dict[str, list] = {}
    for _ in range(rounds):
        for name, fn in parts.items():
            timed.setdefault(name, []).append(host_us(fn, calls, True, 5))
    return [dict(part=name, host_us=min(us), rounds=" ".join(f"{u:.2f}" for u in us))
            for name, us in timed.items()]


def _decode_parts(dev) -> dict:
    """The Gluon decode route's eager host time taken apart (B 16 sequences of 16 keys, 32 / 8
    heads, 128 pairs: on the route on an H100 / H200): the op, its bound function, the same
    bound with a fresh ``torch.empty`` for each partial (before split_counters.partials), the
    Triton kernels' bound function, and the allocations."""
    from attn_ops.backends.triton import decode_kernel, decode_plan, split_counters
    u = _inputs(dev, b=16)
    args = (u.q1, u.k_cache, u.v_cache, u.seqlens, u.table, 0.08)
    if not decode_kernel.hopper_route(u.q1, u.k_cache, u.v_cache, u.table):
        return {}
    kept = split_counters.partials
    split_counters.partials = lambda o, lse, d: (
        torch.empty(o, dtype=torch.float32, device=d), torch.empty(lse, dtype=torch.float32,
                                                                   device=d))
    try:
        fresh = decode_kernel.bind_decode(*args)
    finally:
        split_counters.partials = kept
    gluon = decode_kernel.bind_decode(*args)
    decode_plan.HOPPER_DECODE = False
    try:
        triton_kernels = decode_kernel.bind_decode(*args)
    finally:
        decode_plan.HOPPER_DECODE = True
    rows = 2 * 264 * 4  # the partials' rows at two programs per SM, GQA 4
    return {
        "decode B 16: torch.ops.attn.decode, Gluon route": lambda: torch.ops.attn.decode(*args),
        "decode B 16: bound, Gluon route": lambda: gluon(*args),
        "decode B 16: bound, Gluon route, partials by torch.empty": lambda: fresh(*args),
        "decode B 16: bound, Triton kernels": lambda: triton_kernels(*args),
        "2 x torch.empty (the partials)": lambda: (
            torch.empty((rows, 128), dtype=torch.float32, device=dev),
            torch.empty((rows,), dtype=torch.float32, device=dev)),
        "split_counters.partials (kept)": lambda: split_counters.partials(
            (rows, 128), (rows,), u.q1.device),
    }


def _inference(fn):
    with torch.inference_mode():
        return fn()


def _decode_case(b: int, ctx: int, page: int):
    """A bf16 decode (H 32, Hkv 8, D 128) of B sequences of ``ctx`` tokens: ``page == ctx``
    is a dense token-major cache viewed as paged (one block per sequence, block ids 2, 6, ...:
    block table width 1), a smaller page a shuffled paged cache; and the dense ``[B, Hkv, ctx,
    D]`` slices F.scaled_dot_product_attention would read instead."""
    hkv, h, d, bf = 8, 32, 128, torch.bfloat16
    g = torch.Generator().manual_seed(0)
    if page >= ctx:
        k_cache = torch.randn(4 * b, page, hkv, d, dtype=bf, generator=g)
        table = (torch.arange(b, dtype=torch.int32) * 4 + 2)[:, None].contiguous()
    else:
        width = ctx // page
        k_cache = torch.randn(b * width + 3, page, hkv, d, dtype=bf, generator=g)
        table = torch.randperm(b * width + 3, generator=g)[:b * width].view(b, width)
        table = table.to(torch.int32).contiguous()
    v_cache = torch.randn(k_cache.shape, dtype=bf, generator=g)
    dense = [c[table.long()].reshape(b, -1, hkv, d)[:, :ctx].transpose(1, 2).contiguous()
             for c in (k_cache, v_cache)]  # [B, Hkv, ctx, D], heads-major as gpt-fast's cache
    q = torch.randn(b, h, d, dtype=bf, generator=g)
    seqlens = torch.full((b,), ctx, dtype=torch.int32)
    return q, k_cache, v_cache, seqlens, table, dense


def cpu_defaults(runs: int = 7) -> list[dict]:
    """The default (auto) CPU store and decode through ``torch.ops.attn`` beside the torch
    primitives they replace, one thread, the paths of a shape interleaved in every run: process
    CPU time and wall per call, median (min-max) of ``runs``. Shapes: the tiny one above (B 1
    over 16 tokens, pages of 16: table width 1), and B 4 over 1024 tokens as a dense cache
    viewed as paged (width 1) and in shuffled pages of 16 (width 64). The decode baselines:
    F.scaled_dot_product_attention on the dense slice with ``enable_gqa`` (as bench rows above
    write it), and with the G query heads of a kv head folded into its rows (the faster form
    of the same call on the CPU)."""
    os.environ.pop("ATTN_OPS_BACKEND", None)
    os.environ["ATTN_OPS_CHECK"] = "0"
    torch.set_num_threads(1)
    import attn_ops  # noqa: F401  (registers torch.ops.attn.*)
    ops = torch.ops.attn
    t = _inputs("cpu")
    v_flat = t.v_cache.view(-1, *t.v_cache.shape[2:])
    cases = [("store_kvcache B 1", 20000, {
        "torch.ops.attn.store_kvcache": lambda: ops.store_kvcache(t.key, t.key, t.k_cache,
                                                                  t.v_cache, t.slots),
        "torch index_copy_ x2": lambda: (t.k_flat.index_copy_(0, t.slots, t.key),
                                         v_flat.index_copy_(0, t.slots, t.key))})]
    for b, ctx, page, calls in ((1, 16, 16, 5000), (4, 1024, 1024, 100), (4, 1024, 16, 100)):
        q, kc, vc, seqlens, table, (kd, vd) = _decode_case(b, ctx, page)
        qd, qf = q.view(b, 32, 1, 128), q.view(b, 8, 4, 128)
        cases.append((f"decode B {b} x {ctx}, pages of {page}", calls, {
            "torch.ops.attn.decode": (lambda q=q, kc=kc, vc=vc, s=seqlens, tb=table:
                                      ops.decode(q, kc, vc, s, tb, 0.08)),
            "F.sdpa, enable_gqa": (lambda qd=qd, kd=kd, vd=vd: F.scaled_dot_product_attention(
                qd, kd, vd, scale=0.08, enable_gqa=True)),
            "F.sdpa, GQA folded": (lambda qf=qf, kd=kd, vd=vd: F.scaled_dot_product_attention(
                qf, kd, vd, scale=0.08))}))
    rows = []
    for shape, calls, paths in cases:
        wall = {name: [] for name in paths}
        cpu = {name: [] for name in paths}
        for fn in paths.values():
            for _ in range(max(calls // 20, 3)):
                fn()
        for _ in range(runs):
            for name, fn in paths.items():  # interleaved: every run times each path once
                w, c = time.perf_counter(), time.process_time()
                for _ in range(calls):
                    fn()
                wall[name].append((time.perf_counter() - w) / calls * 1e6)
                cpu[name].append((time.process_time() - c) / calls * 1e6)
        base = statistics.median(cpu[list(paths)[-1]])
        for name in paths:
            rows.append(dict(bench="cpu_defaults", shape=shape, path=name,
                             cpu_median=statistics.median(cpu[name]), cpu_min=min(cpu[name]),
                             cpu_max=max(cpu[name]), wall_median=statistics.median(wall[name]),
                             wall_min=min(wall[name]), wall_max=max(wall[name]),
                             cpu_vs_last=statistics.median(cpu[name]) / base))
    return rows


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
        rows = [dict(r, date=env["date"], torch=env["torch"]) for r in cpu_defaults()]
        write_csv(args.out / "overhead_cpu_defaults.csv", rows)
        print_table(rows, ["shape", "path", "cpu_median", "cpu_min", "cpu_max", "wall_median",
                           "cpu_vs_last"])
        return
    if args.cpu_triton_path:
        rows = [dict(r, date=env["date"], torch=env["torch"]) for r in cpu_triton_path()]
        write_csv(args.out / "overhead_cpu_triton_path.csv", rows)
        print_table(rows, ["path", "wall_median", "wall_min", "wall_max", "cpu_median",
                           "cpu_min", "cpu_max"])
        return
    if args.cpu_op_path:
        rows = [dict(r, date=env["date"], torch=env["torch"]) for r in cpu_op_path()]
        write_csv(args.out / "overhead_cpu_op_path.csv", rows)
        print_table(rows, ["path", "wall_median", "wall_min", "wall_max", "cpu_median",
                           "cpu_min", "cpu_max"])
        return
    if args.hopper_parts:
        os.environ["ATTN_OPS_BACKEND"] = "triton"
        from attn_ops.backends import triton as tb
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
