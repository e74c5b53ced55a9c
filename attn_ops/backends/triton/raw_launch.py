"""A prepared launch (launch.prepare) calling the compiled launcher's C function directly.

Below ``CompiledKernel.run`` Triton 3.6 still runs Python on every launch (CudaLauncher):
it allocates the global and profile scratch (none for our kernels) and, for a kernel with host
TMA descriptors (the Gluon Hopper prefill's Q/K/V), passes over every argument to encode each
descriptor as a CUtensorMap (``make_tensordesc_arg``: a dict of metadata read, then
``fill_tma_descriptor``). The C function then reads each tensor's address through its
``data_ptr()`` method and validates it with ``cuPointerGetAttribute``, one driver call per
pointer (the fixup launch of the Hopper route passes 12).

For one prepared launch all of that is fixed but the addresses: the signature pins every
tensor's device, dtype, shape and strides. :func:`build` turns such a launch into one generated
function that reads the addresses itself (ints skip the method call and the driver check),
encodes a descriptor only for a base address it has not seen (a CUtensorMap is a pure function
of the address and the signature's fields, so a kept one is exact; K/V caches keep their
address from call to call) and calls the C function. Anything it does not recognise (another
Triton, a scratch buffer, a cooperative or multi-CTA launch, a descriptor whose fields are not
the pinned ones) gives None or a False return, and the caller keeps Triton's path.

A caller that reads the addresses itself (the Hopper route's two launches share eight of them)
calls ``fire.at`` instead: the same launch from the addresses as ints, with no check at all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_MAX_KEPT = 64  # encoded descriptors kept per descriptor argument (q's address moves per call)
_WRAPPER_CELLS = ("launcher", "tensordesc_indices", "tensordesc_meta")


def build(bound, args: tuple, tail: tuple, grid: tuple, check) -> Callable | None:
    """``fire(args, stream) -> bool`` for ``bound`` (launch._Bound) launched over ``grid``
    (3 ints) with ``args`` like these and the parameters ``tail`` after them, or None when the
    launcher is not one this module knows. ``check``: the positions of the tensors whose
    address must be a multiple of 16 (None: every tensor). ``fire`` returns False, launching
    nothing, when such an address is not, or when a descriptor's fields are not the ones seen
    here. ``fire.at(addresses, stream)``: the same launch from ``args`` with every tensor (and
    every descriptor) replaced by its (base's) address, unchecked: for a caller that has read and
    checked the addresses itself, and whose descriptors have the pinned fields."""
    launcher = bound.run
    if (type(launcher).__name__ != "CudaLauncher" or getattr(launcher, "global_scratch_size", 1)
            or getattr(launcher, "profile_scratch_size", 1)
            or getattr(launcher, "launch_cooperative_grid", True)):
        return None
    c_launch, encoders = _unwrap(launcher.launch, args)
    if c_launch is None:
        return None
    names = {"launch": c_launch, "function": bound.function, "packed": bound.packed,
             "tail": tail, "pdl": bool(getattr(launcher, "launch_pdl", False)), "g": grid}
    lines, params, checked = [], [], []
    for i, a in enumerate(args):
        if i in encoders:
            names[f"e{i}"] = encoders[i]
            lines.append(f"    d{i} = e{i}(a[{i}])")
            lines.append(f"    if d{i} is None: return False")
            params.append(f"*d{i}")
        elif isinstance(a, torch.Tensor):
            lines.append(f"    p{i} = a[{i}].data_ptr()")
            params.append(f"p{i}")
            if check is None or i in check:
                checked.append(f"p{i}")
        elif is_descriptor(a):
            return None  # a descriptor the wrapper did not expand: not a layout we know
        else:
            params.append(f"a[{i}]")
    if checked:
        lines.append(f"    if ({' | '.join(checked)}) & 15: return False")

    def call(params: list) -> str:
        return ("    launch(g[0], g[1], g[2], stream, function, False, pdl, None, None, packed, "
                f"None, None, None, {''.join(p + ', ' for p in params)}*tail)\n")
    # fire.at: the addresses given (a tensor's as an int, a descriptor's base's), nothing read
    # or checked; a descriptor's CUtensorMap from its encoder's kept ones, by that address.
    at_lines = [f"    d{i} = e{i}.at(a[{i}])\n" for i in sorted(encoders)]
    at_params = [f"*d{i}" if i in encoders else f"a[{i}]" for i in range(len(args))]
    src = ("def fire(a, stream):\n" + "".join(line + "\n" for line in lines) + call(params)
           + "    return True\n\n\n"
           "def at(a, stream):\n" + "".join(at_lines) + call(at_params))
    exec(compile(src, "<attn_ops raw launch>", "exec"), names)  # noqa: S102 (our own text)
    names["fire"].at = names["at"]
    return names["fire"]


def _unwrap(launch, args: tuple) -> tuple:
    """(the C launch function, {argument position: descriptor encoder}) behind ``launch``
    (CudaLauncher.launch: the C function itself, or Triton's descriptor wrapper around it), or
    (None, None) when it is neither as Triton 3.6 builds them."""
    code = getattr(launch, "__code__", None)
    if code is None:
        return launch, {}  # the C function: no descriptor argument
    if tuple(sorted(code.co_freevars)) != _WRAPPER_CELLS or launch.__closure__ is None:
        return None, None
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in launch.__closure__)))
    positions, metas = sorted(cells["tensordesc_indices"]), cells["tensordesc_meta"]
    fill, dtype_to_host = _encoding()
    if (fill is None or not metas or len(metas) != len(positions)
            or any(p >= len(args) or not is_descriptor(args[p]) for p in positions)):
        return None, None
    encoders = {}
    for p, meta in zip(positions, metas):
        encoders[p] = _encoder(meta, args[p], fill, dtype_to_host)
        if encoders[p] is None:
            return None, None
    return cells["launcher"], encoders


def _encoding():
    """(Triton's ``fill_tma_descriptor``, its device-to-host TMA dtype map), or (None, None)."""
    try:
        from triton.backends.nvidia.driver import TMA_DTYPE_DEVICE_TO_HOST
        from triton.runtime import driver
        return driver.active.utils.fill_tma_descriptor, TMA_DTYPE_DEVICE_TO_HOST
    except (ImportError, AttributeError):
        return None, None


def _encoder(meta, desc, fill, dtype_to_host) -> Callable | None:
    """``encode(d)``: the launcher's arguments for descriptor ``d`` (its CUtensorMap, shape and
    strides, as ``make_tensordesc_arg`` gives them), or None when ``d``'s fields are not
    ``desc``'s; None when ``meta`` is not a layout this module knows."""
    if not isinstance(meta, dict) or meta.get("fp4_padded") or meta.get("elem_type") not in \
            dtype_to_host or list(desc.strides)[-1:] != [1]:
        return None
    shape, strides, block = desc.shape, desc.strides, desc.block_shape
    fields = (meta["swizzle"], meta["elem_size"], dtype_to_host[meta["elem_type"]],
              meta["block_size"], list(shape), list(strides), 1 if desc.padding == "nan" else 0)
    after = (*shape, *strides)
    kept: dict[int, tuple] = {}

    def at(address: int) -> tuple:
        """The arguments for a descriptor of these fields over ``address``."""
        hit = kept.get(address)
        if hit is None:
            if len(kept) >= _MAX_KEPT:
                kept.clear()
            hit = kept[address] = (fill(address, *fields), *after)
        return hit

    def encode(d):
        if d.shape is not shape or d.strides is not strides or d.block_shape is not block:
            return None  # not the pinned descriptor's fields (shared by the bound maker)
        return at(d.base.data_ptr())
    encode.at = at
    return encode


def is_descriptor(a) -> bool:
    """``a`` is a host TMA descriptor (Gluon's or Triton's ``TensorDescriptor``: a base tensor,
    shape, strides, block shape and shared layout), which the compiled launcher encodes."""
    return hasattr(a, "block_shape") and hasattr(a, "base")
