"""Where the Hopper routes' eager host time goes (bench_overhead.py ``--hopper-parts``, an sm90
GPU): the Hopper prefill route's parts and the Gluon decode route's, each timed back to back."""

from __future__ import annotations

import torch

from overhead_common import CALLS, bound_decode_routes, host_us, tiny_inputs


def hopper_parts(dev, calls: int = CALLS, rounds: int = 2) -> list[dict]:
    """The Hopper route's eager host time taken apart (see the module docstring)."""
    from attn_ops.backends import triton as tb
    from attn_ops.backends.triton import hopper_prefill_launch as hopper
    from attn_ops.backends.triton import launch, raw_launch, split_counters
    t = tiny_inputs(dev)
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
    def through_launchers():  # the bound function before its launches from addresses
        direct_stream = launch.direct_stream
        launch.direct_stream = lambda device: None
        try:
            return run(*args)
        finally:
            launch.direct_stream = direct_stream

    parts = {
        "torch.ops.attn.prefill, Hopper route": lambda: torch.ops.attn.prefill(*args),
        "the bound function (bind_prefill_guarded)": lambda: run(*args),
        "the bound function through the prepared launchers": through_launchers,
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
    from attn_ops.backends.triton import decode_kernel, split_counters
    routes = bound_decode_routes(dev)
    if routes is None:
        return {}
    args, gluon, triton_kernels = routes
    kept = split_counters.partials
    split_counters.partials = lambda o, lse, d: (
        torch.empty(o, dtype=torch.float32, device=d), torch.empty(lse, dtype=torch.float32,
                                                                   device=d))
    try:
        fresh = decode_kernel.bind_decode(*args)
    finally:
        split_counters.partials = kept
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
            (rows, 128), (rows,), args[0].device),
    }
