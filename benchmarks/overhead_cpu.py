"""The host-overhead sections that need no GPU (bench_overhead.py ``--cpu-op-path``,
``--cpu-triton-path``, ``--cpu-defaults``): the op path above a no-op backend, the Triton
backend's host path with no-op launchers, and the default CPU store and decode beside the torch
calls they replace. See bench_overhead.py's docstring for each section's method."""

from __future__ import annotations

import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

from overhead_common import tiny_inputs


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
    t = tiny_inputs("cpu")
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
    t = tiny_inputs("cpu")
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
    CPU time and wall per call, median (min-max) of ``runs``. Shapes: the tiny one (B 1
    over 16 tokens, pages of 16: table width 1), and B 4 over 1024 tokens as a dense cache
    viewed as paged (width 1) and in shuffled pages of 16 (width 64). The decode baselines:
    F.scaled_dot_product_attention on the dense slice with ``enable_gqa`` (as bench_overhead.py
    writes it), and with the G query heads of a kv head folded into its rows (the faster form
    of the same call on the CPU)."""
    os.environ.pop("ATTN_OPS_BACKEND", None)
    os.environ["ATTN_OPS_CHECK"] = "0"
    torch.set_num_threads(1)
    import attn_ops  # noqa: F401  (registers torch.ops.attn.*)
    ops = torch.ops.attn
    t = tiny_inputs("cpu")
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
