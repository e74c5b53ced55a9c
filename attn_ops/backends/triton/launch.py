"""Launch a Triton kernel through its compiled launcher, skipping ``JITFunction.run`` after the
first call of each specialisation.

``kernel[grid](*args, **constexprs)`` costs about 20 us of host time per launch in Triton 3.6
(H100/H200 hosts; BENCHMARKS.md "Eager host overhead"): it binds the arguments through a
generated signature function, builds a string cache key, checks the kernel's global variables,
fetches the device and stream, builds a launch-metadata dict for the launch hooks, and only then
calls the C launcher. The decode and store kernels themselves take 3-10 us on the GPU, so the
launch, not the kernel, sets the eager time of a small call.

:func:`launch` is a drop-in for that call. The first call with a given *specialisation* goes
through Triton's own ``run`` (which compiles or finds the kernel, launches it and returns the
``CompiledKernel``); the launcher, function handle and packed metadata it returns are kept under
that specialisation, and every later call with the same one calls the launcher directly. The
specialisation key here refines Triton's own (so the kernel it maps to is always the kernel
Triton would run):

* a tensor: its dtype (the pointer type) and whether its address is a multiple of 16 (Triton's
  ``tt.divisibility`` attribute), read per call, since a view may move the address;
* an int: whether it is 1, a multiple of 16, and within int32 (Triton's int specialisations);
* a float, a bool, None: their type (Triton specialises no value of these);
* the constexpr and option keywords (``BLOCK_N=64, num_warps=4``): their values;
* the current device (Triton keeps one kernel cache per device);
* a host TMA descriptor (the Gluon Hopper prefill's Q/K/V): its base's dtype and alignment,
  block shape, shape, strides, padding and shared layout (Triton specialises on a subset); the
  compiled launcher encodes the descriptor itself on every call (``fill_tma_descriptor``),
  except in a prepared launch that raw_launch serves (once per base address there).

Other arguments (a grid given as a function, a tuple, an unhashable constexpr) make the call go
through ``kernel[grid]`` unchanged. Triton's knobs that change how a kernel compiles
(``TRITON_DEBUG``, instrumentation) are read when a specialisation is first seen: set them
before the first launch. The per-call check that a kernel's global variables have not
changed is not repeated (ours read only constants).

Computing that key costs ~7 us per launch of a 26-argument kernel on the development CPU. Inside
a call *bound to one call signature* (:func:`bind_signature`: the Triton backend's ``bind()``,
which the registry's dispatch memo calls once per signature of shapes, strides, dtypes, devices
and scalars), every non-pointer argument and the grid are the same on every call, because the
kernel wrappers derive them from that metadata only. There the n-th launch of a call reuses the
n-th launch of the signature's first call after checking only what metadata cannot pin: the
kernel, the grid, the argument count, and that every tensor address is still a multiple of 16
(one generated expression). Any mismatch takes the keyed path above.

The Triton backend's ``bind()`` goes one step further (:func:`prepare`): it plans a call
signature once, so each of its launches has every non-pointer argument, the grid and the
constexprs fixed; a prepared launch then checks the current device and the alignment of the
caller's tensors only, and calls the launcher (~1.5 us of Python on the development CPU).

Under the interpreter (``TRITON_INTERPRET=1``, CPU tensors) there is no compiled launcher: every
call is ``kernel[grid](...)``.

Triton 3.6 (the GPU machine) and 3.9 (CI) share this launcher interface:
``CompiledKernel.run(grid_x, grid_y, grid_z, stream, function, packed_metadata,
launch_metadata, enter_hook, exit_hook, *all_params)``, all parameters in order, constexprs
included (the launcher skips them).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from attn_ops.backends.triton import raw_launch
from attn_ops.backends.triton.raw_launch import is_descriptor

_INT32_MIN, _INT32_MAX = -(2 ** 31), 2 ** 31 - 1


class _Bound(NamedTuple):
    """One specialisation of a kernel, ready to launch."""
    run: Any              # the C launcher (CompiledKernel.run, handles loaded)
    function: Any         # the CUfunction handle
    packed: Any           # packed metadata the launcher expects
    compiled: Any         # the CompiledKernel (for launch_metadata when a hook is set)
    tail: tuple           # the parameters after the positional ones (constexprs), in order


# id(kernel) -> {specialisation key: _Bound}. Kernels are module-level objects that live as long
# as the process, so their ids are stable.
_bound: dict[int, dict] = {}
_MAX_PER_KERNEL = 256  # a long-running server sees a handful; a sweep may see more
# Launches each way, and calls served by a per-signature function of the Triton backend's
# bind() ("bound"); of the direct ones, those through raw_launch ("raw"). Tests and benchmarks
# read it.
stats = {"direct": 0, "triton": 0, "bound": 0, "raw": 0}
enabled = True  # False: every launch through kernel[grid] (tests compare; debugging)
# False: prepared launches pinned from now on call CompiledKernel.run, not raw_launch's call of
# the C launch function (benchmarks compare; debugging).
raw = True

_driver = None


def _runtime():
    """(get_current_device, get_current_stream, knobs.runtime) of the active Triton driver."""
    global _driver
    if _driver is None:
        from triton import knobs
        from triton.runtime import driver
        _driver = (driver.active.get_current_device, driver.active.get_current_stream,
                   knobs.runtime)
    return _driver


def _arg_key(args: tuple) -> tuple | None:
    """The specialisation of the positional arguments, or None when one is not a plain kind."""
    key = []
    append = key.append
    for a in args:
        t = type(a)
        if t is int:
            append(1 if a == 1 else (16 if a % 16 == 0 else 0)
                    + (0 if _INT32_MIN <= a <= _INT32_MAX else 64))
        elif isinstance(a, torch.Tensor):
            append((a.dtype, a.data_ptr() % 16 == 0))
        elif t is float or t is bool or a is None:
            append(t)
        elif is_descriptor(a):  # all of a host TMA descriptor but its base's address
            append((t, a.base.dtype, a.base.data_ptr() % 16 == 0, tuple(a.block_shape),
                    tuple(a.shape), tuple(a.strides), a.padding, repr(a.layout)))
        else:
            return None
    return tuple(key)


def _traced(first) -> bool:
    """The launch is being traced: its first argument (a descriptor's base, for Gluon kernels
    that lead with descriptors) is a fake / functional tensor or a subclass, or a dispatch mode
    is active."""
    if type(first) is not torch.Tensor:  # a plain tensor first skips the attribute probes
        if not is_descriptor(first):
            return True
        first = first.base
    return type(first) is not torch.Tensor or bool(torch._C._len_torch_dispatch_stack())


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, through the compiled launcher after the first call.

    ``args`` are the kernel's leading parameters (tensors, ints, floats) in order; ``kwargs``
    its remaining parameters (constexprs) by name and launch options (``num_warps``,
    ``num_stages``). ``grid`` is a tuple of 1 to 3 ints.
    """
    if _traced(args[0]):
        # Traced (fake or functional tensors, a dispatch mode): inside a triton_op being traced
        # by AOTAutograd, the launch must become a node Inductor can compile. Inductor takes
        # no ``launch_pdl`` option, so its launch is a plain one and the kernel needs no wait
        # (whose inline asm Inductor's analysis of what a kernel mutates cannot read: it gave
        # wrong outputs, H200).
        from torch.library import wrap_triton
        if kwargs.pop("launch_pdl", False):
            kwargs["PDL"] = False
        wrap_triton(kernel)[grid](*args, **kwargs)
        return
    if not enabled or not hasattr(kernel, "device_caches") or type(grid) is not tuple:
        kernel[grid](*args, **kwargs)  # the interpreter, or a grid function
        return
    get_device, get_stream, runtime = _runtime()
    device = get_device()
    state = _signature.get()
    if state is not None:  # inside a call bound to one signature: the n-th launch of the call
        launches, index = state[0], state[1]
        state[1] = index + 1
        pinned = launches[index] if index < len(launches) else None
        if (pinned is not None and pinned.kernel is kernel and pinned.grid == grid
                and pinned.device == device and len(args) == pinned.nargs
                and pinned.aligned(args)):
            _direct(pinned.bound, grid, get_stream(device), runtime, args)
            return
        bound = _keyed(kernel, grid, args, kwargs, device, get_stream, runtime)
        if pinned is None and index == len(launches) and bound is not None:
            launches.append(_pin(kernel, grid, device, args, bound))
        return
    _keyed(kernel, grid, args, kwargs, device, get_stream, runtime)


def _keyed(kernel, grid, args, kwargs, device, get_stream, runtime) -> _Bound | None:
    """Launch through the specialisation key; the bound specialisation, or None."""
    arg_key = _arg_key(args)
    try:
        key = (device, arg_key, tuple(kwargs.items())) if arg_key is not None else None
        per_kernel = _bound.get(id(kernel))
        bound = per_kernel.get(key) if (per_kernel is not None and key is not None) else None
    except TypeError:  # an unhashable keyword value
        key = bound = None
    if bound is None:
        return _first_launch(kernel, grid, args, kwargs, key)
    _direct(bound, grid, get_stream(device), runtime, args)
    return bound


def _direct(bound: _Bound, grid: tuple, stream, runtime, args: tuple) -> None:
    """Call the compiled launcher as ``JITFunction.run`` would."""
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    if _idle(enter) and _idle(leave):
        bound.run(grid[0], g1, g2, stream, bound.function, bound.packed, None, None, None,
                  *args, *bound.tail)
    else:  # a profiler's hooks are set: give them what JITFunction.run gives them
        full = (*args, *bound.tail)
        meta = bound.compiled.launch_metadata(grid, stream, *full)
        bound.run(grid[0], g1, g2, stream, bound.function, bound.packed, meta, enter, leave,
                  *full)
    stats["direct"] += 1


def _idle(hook) -> bool:
    """True for no hook: None (older Triton) or an empty HookChain (3.6+)."""
    return hook is None or (type(hook).__name__ == "HookChain" and not hook.calls)


def _first_launch(kernel, grid, args, kwargs, key) -> _Bound | None:
    """Launch through Triton's ``run`` and keep what it compiled under ``key``."""
    compiled = kernel.run(*args, grid=grid, warmup=False, **kwargs)
    stats["triton"] += 1
    if key is None or compiled is None:
        return None
    if hasattr(compiled, "result"):  # an asynchronous compile (Triton's async mode)
        compiled = compiled.result()
    tail = []
    for p in kernel.params[len(args):]:
        if p.name in kwargs:
            tail.append(kwargs[p.name])
        elif p.has_default:
            tail.append(p.default)
        else:
            return None  # a parameter we cannot place: keep launching through run()
    per_kernel = _bound.setdefault(id(kernel), {})
    if len(per_kernel) >= _MAX_PER_KERNEL:
        per_kernel.clear()
    run = compiled.run  # loads the module and creates the launcher on first access
    bound = per_kernel[key] = _Bound(run, compiled.function, compiled.packed_metadata, compiled,
                                     tuple(tail))
    return bound


# ---------------------------------------------------------------------------------------------
# Launches bound to one call signature
# ---------------------------------------------------------------------------------------------

# [launches of the signature, index of the next launch in this call], set by bind_signature.
_signature: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "attn_ops_triton_signature", default=None)


class _Pinned(NamedTuple):
    """The n-th launch of a signature's calls."""
    kernel: Any
    grid: tuple
    device: Any
    nargs: int
    aligned: Callable[[tuple], bool]  # every tensor address still a multiple of 16
    bound: _Bound


def _pin(kernel, grid, device, args, bound: _Bound, check=None) -> _Pinned | None:
    """A pinned launch, or None when a tensor address is not 16-aligned (keyed path then);
    later calls check the tensors at positions ``check`` (default: every tensor)."""
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    if any(args[i].data_ptr() % 16 for i in tensors):
        return None
    if check is not None:
        tensors = [i for i in tensors if i in check]
    # One expression, generated once: ~0.1 us per tensor instead of a Python loop's ~0.3.
    expr = " | ".join(f"a[{i}].data_ptr()" for i in tensors) or "0"
    aligned = eval(f"lambda a: not (({expr}) & 15)")  # noqa: S307 (our own text)
    return _Pinned(kernel, grid, device, len(args), aligned, bound)


def bind_signature(fn: Callable) -> Callable:
    """``fn`` (a kernel wrapper) with its launches pinned on its first call.

    Call it once per call signature (shapes, strides, dtypes, devices and scalars of the
    arguments: what the registry's dispatch memo is keyed by) and call the result only with
    arguments of that signature.
    """
    launches: list = []

    def run(*args, **kwargs):
        token = _signature.set([launches, 0])
        try:
            return fn(*args, **kwargs)
        finally:
            _signature.reset(token)
    run.launches = launches
    return run


# ---------------------------------------------------------------------------------------------
# Prepared launches: one launch of a call signature, everything but the tensors fixed
# ---------------------------------------------------------------------------------------------

def _device_getter(get_device):
    """The current-device getter a pinned launch calls: torch's C function where Triton's is
    ``torch.cuda.current_device``, whose Python layer (a lazy-initialisation check, needless
    once a kernel has launched) costs ~0.3 us per call on the development CPU."""
    cuda = getattr(torch, "cuda", None)
    raw = getattr(torch._C, "_cuda_getDevice", None)
    if raw is not None and cuda is not None and get_device is cuda.current_device:
        return raw
    return get_device


def prepare(kernel, grid: tuple, kwargs: dict, check: tuple[int, ...] | None = None,
            fixed: tuple = ()) -> Callable[[tuple], None]:
    """``launcher(args)``: ``kernel[grid](*args, *fixed, **kwargs)`` for one launch of one call
    signature.

    The kernel wrappers' per-signature functions (``bind_*``) build one per launch when a
    signature is first seen: the grid, constexprs and options are fixed here, every
    non-pointer argument is fixed by the signature, and only the tensors of ``args`` change
    from call to call. The first call (and any call that cannot go direct) takes
    :func:`launch`'s path: Triton's ``run``, then the keyed specialisation. From then on a call
    checks only what the signature cannot pin, the current device and that every tensor address
    is still a multiple of 16 (one generated expression), and calls the compiled launcher
    (~1.5 us of Python on the development CPU against 3.5 for :func:`bind_signature`'s lookup
    and 7.5 for the keyed path). Where raw_launch knows the launcher, the call goes one level
    lower: the C launch function with the addresses as ints and TMA descriptors encoded once
    per base address (see raw_launch). A launch hook (a profiler) gets what
    ``JITFunction.run`` gives it. Under the interpreter every call is ``kernel[grid](...)``.

    ``check``: the positions of the tensors whose alignment a call must check (default: every
    tensor). The wrappers leave out what they allocate themselves (torch's allocators align
    every block far beyond 16 bytes) and placeholders that repeat a checked tensor: ~0.07 us
    per tensor. The first launch checks every tensor before it pins.

    ``fixed``: the kernel's arguments after ``args`` that the signature fixes (strides, sizes,
    scalars), joined to the constexprs once when the launch is pinned instead of into every
    call's argument tuple (~0.1 us for 20 of them).
    """
    g0, g1, g2 = (*grid, 1, 1)[:3]
    # After the first launch that could pin: its device, alignment check, launcher, handle,
    # metadata, the parameters after ``args`` (fixed + constexprs), and the driver's getters.
    device = aligned = run = function = packed = tail = None
    get_device = get_stream = runtime = None
    hook_chain = None  # Triton's HookChain class: a chain with no calls is no hook
    pinned = None  # the _Bound specialisation
    fire = None  # raw_launch.build's call of the C launch function, when it knows the launcher

    def launcher(args: tuple) -> None:
        nonlocal device, aligned, run, function, packed, tail, get_device, get_stream, runtime
        nonlocal hook_chain, pinned, fire
        if run is not None and enabled and get_device() == device:
            enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
            idle = (enter is None or enter.__class__ is hook_chain and not enter.calls) and (
                leave is None or leave.__class__ is hook_chain and not leave.calls)
            if idle and fire is not None:
                if fire(args, get_stream(device)):  # False: an address moved off 16 bytes
                    stats["direct"] += 1
                    stats["raw"] += 1
                    return
            elif aligned(args):
                if idle:
                    run(g0, g1, g2, get_stream(device), function, packed, None, None, None,
                        *args, *tail)
                    stats["direct"] += 1
                else:  # a profiler's hooks are set: give them what JITFunction.run gives them
                    _direct(pinned, grid, get_stream(device), runtime, args + fixed)
                return
        full = args + fixed if fixed else args
        if _traced(args[0]) or not enabled or not hasattr(kernel, "device_caches"):
            launch(kernel, grid, *full, **kwargs)  # traced, disabled or interpreted
            return
        getters = _runtime()
        current = getters[0]()
        bound = _keyed(kernel, grid, full, kwargs, current, getters[1], getters[2])
        if bound is not None:
            pin = _pin(kernel, grid, current, args, bound, check)
            if pin is not None:
                pinned = bound
                device, aligned, function, packed = current, pin.aligned, bound.function, \
                    bound.packed
                tail = fixed + bound.tail
                get_device, get_stream, runtime = _device_getter(getters[0]), *getters[1:]
                for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
                    if type(hook).__name__ == "HookChain":
                        hook_chain = type(hook)
                run = bound.run
                fire = raw_launch.build(bound, args, tail, (g0, g1, g2), check) if raw else None
                # A re-pin (another device, other descriptor fields) replaces or drops them.
                launcher.device, launcher.at = (device, fire.at) if fire is not None else (
                    None, None)
    launcher.kernel, launcher.grid, launcher.kwargs, launcher.fixed = kernel, grid, kwargs, fixed
    launcher.device = launcher.at = None  # set once pinned where raw_launch serves the launcher
    return launcher


def direct_stream(device: int):
    """The current stream's handle when a prepared launch's ``at`` (pinned on ``device``, a
    CUDA device index) may fire now: launches enabled, ``device`` current, no launch hook set
    (a profiler's hooks get Triton's path); else None. For a caller making several prepared
    launches from addresses it read once (hopper_prefill_launch.bind_prefill_guarded)."""
    global _fast_device
    get_device, get_stream, runtime = _runtime()
    if _fast_device is None or _fast_device[0] is not get_device:
        _fast_device = (get_device, _device_getter(get_device))
    if (enabled and _fast_device[1]() == device and _idle(runtime.launch_enter_hook)
            and _idle(runtime.launch_exit_hook)):
        return get_stream(device)
    return None


_fast_device = None  # (_runtime()'s current-device getter, :func:`_device_getter`'s for it)


def clear() -> None:
    """Forget every bound specialisation (tests; after changing Triton knobs)."""
    _bound.clear()
