"""raw_launch.py: a prepared launch calling the compiled launcher's C function directly.

On the CPU there is no compiled launcher, so these tests hand launch.prepare a stand-in for
Triton 3.6's ``CudaLauncher`` (same class name and attributes; its ``launch`` the C function, or
a closure shaped like Triton's descriptor wrapper around it) and check what the C function
receives: every address as an int, each descriptor expanded as ``make_tensordesc_arg`` expands
it and encoded once per base address, the parameters after them in order. Launchers it does not
know, a misaligned address and a descriptor with other fields keep Triton's path. Marked
``cuda`` elsewhere (test_bound_calls.py, test_hopper_prefill_kernel.py): on the real launchers
the counters show the raw path taken, and outputs equal Triton's launch bit for bit.
"""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("triton")
from triton.runtime.jit import JITFunction  # noqa: E402

from attn_ops.backends.triton import launch, raw_launch  # noqa: E402


def _toy(X, Y, n, scale, flag, BLOCK, MODE="a"):
    pass


class _CFunction:
    """The C launch function: records its arguments (no ``__code__``, like a builtin)."""

    def __init__(self, log):
        self.log = log

    def __call__(self, *args):
        self.log.append(("c",) + args)


def _descriptor_wrapper(launcher, tensordesc_indices, tensordesc_meta):
    """Shaped like Triton 3.6's wrap_handle_tensordesc: a closure over these three names."""
    def inner(*args):
        return launcher(tensordesc_indices, tensordesc_meta, *args)
    return inner


def _fake(monkeypatch, descriptors=None, **attrs):
    """A JITFunction of ``_toy`` whose compiled launcher is a stand-in CudaLauncher; the log."""
    log = []
    c_function = _CFunction(log)

    class CudaLauncher:
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid, launch_pdl = False, False
        launch = (c_function if descriptors is None else _descriptor_wrapper(
            c_function, set(descriptors), list(descriptors.values())))

        def __call__(self, *args):
            log.append(("wrapper",) + args)
    for name, value in attrs.items():
        setattr(CudaLauncher, name, value)

    class Compiled:
        function, packed_metadata, run = "function", "packed", CudaLauncher()

        def launch_metadata(self, grid, stream, *args):
            return "meta"

    def run(*args, grid, warmup, **kw):
        log.append(("triton",) + args)
        return Compiled()
    kernel = JITFunction(_toy)
    kernel.run = run
    runtime = types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    monkeypatch.setattr(launch, "_driver", (lambda: 0, lambda device: "stream", runtime))
    launch.clear()
    return kernel, log


def test_addresses_go_as_ints_with_every_parameter_in_order(monkeypatch):
    kernel, log = _fake(monkeypatch)
    x, y = torch.randn(64), torch.randn(64)
    go = launch.prepare(kernel, (3, 2), dict(BLOCK=32), check=(0,), fixed=(0.5, True))
    raw = launch.stats["raw"]
    go((x, y, 5))
    go((y, x, 5))
    assert [e[0] for e in log] == ["triton", "c"] and launch.stats["raw"] == raw + 1
    assert log[1] == ("c", 3, 2, 1, "stream", "function", False, False, None, None, "packed",
                      None, None, None, y.data_ptr(), x.data_ptr(), 5, 0.5, True, 32, "a")
    go((x[1:], y, 5))  # the checked tensor 4 bytes off 16: Triton's path, nothing launched raw
    assert log[-1][0] == "triton" and launch.stats["raw"] == raw + 1
    go((x, y[1:], 5))  # an unchecked one: raw
    assert log[-1][0] == "c" and log[-1][15] == y.data_ptr() + 4


def test_at_fires_the_same_launch_from_the_addresses(monkeypatch):
    """``at`` (set once pinned): the C function's call that a launch of these tensors makes,
    from their addresses as ints, on the stream given, nothing checked."""
    kernel, log = _fake(monkeypatch)
    x, y = torch.randn(64), torch.randn(64)
    go = launch.prepare(kernel, (3, 2), dict(BLOCK=32), check=(0,), fixed=(0.5, True))
    assert go.at is None and go.device is None
    go((x, y, 5))  # pins
    assert go.device == 0
    go((y, x, 5))
    go.at((y.data_ptr(), x.data_ptr(), 5), "another stream")
    assert log[2] == log[1][:4] + ("another stream",) + log[1][5:]
    go.at((x.data_ptr() + 4, y.data_ptr(), 5), "stream")  # unchecked: the caller checks
    assert log[3][14:16] == (x.data_ptr() + 4, y.data_ptr())


def test_direct_stream_only_where_a_pinned_launch_may_fire(monkeypatch):
    """The current stream for ``at`` launches on the current device; None for another device,
    with a launch hook set (a profiler gets Triton's path) or with launches disabled."""
    _fake(monkeypatch)
    assert launch.direct_stream(0) == "stream" and launch.direct_stream(1) is None
    monkeypatch.setattr(launch._driver[2], "launch_exit_hook", lambda meta: None)
    assert launch.direct_stream(0) is None
    monkeypatch.setattr(launch._driver[2], "launch_exit_hook", None)
    monkeypatch.setattr(launch, "enabled", False)
    assert launch.direct_stream(0) is None


def test_a_hook_takes_the_wrapper(monkeypatch):
    """A profiler's hook set: the launch goes through CompiledKernel.run, as Triton's would."""
    kernel, log = _fake(monkeypatch)
    x = torch.randn(64)
    go = launch.prepare(kernel, (1,), dict(BLOCK=16), fixed=(0.5, False))
    go((x, x, 1))
    launch._driver[2].launch_enter_hook = lambda meta: None
    go((x, x, 1))
    assert [e[0] for e in log] == ["triton", "wrapper"] and log[1][7] == "meta"


@pytest.mark.parametrize("attrs", [dict(global_scratch_size=256), dict(profile_scratch_size=8),
                                   dict(launch_cooperative_grid=True)])
def test_launchers_it_does_not_know_keep_the_wrapper(monkeypatch, attrs):
    kernel, log = _fake(monkeypatch, **attrs)
    x = torch.randn(64)
    go = launch.prepare(kernel, (1,), dict(BLOCK=16), fixed=(0.5, False))
    for _ in range(2):
        go((x, x, 1))
    assert [e[0] for e in log] == ["triton", "wrapper"]


def _descriptor(base, shape=None, strides=None, block=None):
    return types.SimpleNamespace(base=base, shape=shape or [64, 32], strides=strides or [32, 1],
                                 block_shape=block or [16, 32], padding="zero", layout="nvmma")


def test_a_descriptor_is_encoded_once_per_base_address(monkeypatch):
    """Expanded as make_tensordesc_arg does (the CUtensorMap, shape, strides), with the
    encoder's fields from the metadata; a base seen before is not encoded again; a descriptor
    whose fields are other objects than the pinned ones takes Triton's path."""
    meta = dict(swizzle=128, elem_size=2, elem_type=5, block_size=[16, 32], fp4_padded=False)
    kernel, log = _fake(monkeypatch, descriptors={0: meta})
    encoded = []

    def fill(address, *fields):
        encoded.append((address, *fields))
        return f"map{len(encoded)}"
    monkeypatch.setattr(raw_launch, "_encoding", lambda: (fill, {5: 50}))
    shape, strides, block = [64, 32], [32, 1], [16, 32]
    a, b, y = torch.randn(64, 32), torch.randn(64, 32), torch.randn(64)
    go = launch.prepare(kernel, (4,), dict(BLOCK=16), check=(1,), fixed=(0.5, False))
    go((_descriptor(a, shape, strides, block), y, 7))  # Triton's path: pins
    for base in (a, b, a):
        go((_descriptor(base, shape, strides, block), y, 7))
    assert [e[0] for e in log] == ["triton", "c", "c", "c"]
    assert encoded == [(a.data_ptr(), 128, 2, 50, [16, 32], [64, 32], [32, 1], 0),
                       (b.data_ptr(), 128, 2, 50, [16, 32], [64, 32], [32, 1], 0)]
    assert log[1][14:] == ("map1", 64, 32, 32, 1, y.data_ptr(), 7, 0.5, False, 16, "a")
    assert log[2][14] == "map2" and log[3][14] == "map1"
    # From addresses: a base seen before takes its kept encoding, a new one is encoded once.
    c = torch.randn(64, 32)
    go.at((a.data_ptr(), y.data_ptr(), 7), "stream")
    assert log[-1] == log[1] and len(encoded) == 2
    go.at((c.data_ptr(), y.data_ptr(), 7), "stream")
    go.at((c.data_ptr(), y.data_ptr(), 7), "stream")
    assert encoded[2:] == [(c.data_ptr(),) + encoded[0][1:]] and log[-1][14] == "map3"
    go((_descriptor(a, [64, 32], strides, block), y, 7))  # equal fields, other objects
    assert log[-1][0] == "wrapper" and len(encoded) == 3  # the keyed path
    # ... which re-pins: ``at`` follows the new pin, and is dropped by one raw_launch cannot
    # serve (here: raw launches switched off).
    assert go.at is not None and go.at.__globals__["e0"](_descriptor(b, shape, strides, block)) \
        is None
    monkeypatch.setattr(launch, "raw", False)
    go((_descriptor(a, [64, 32], [32, 1], block), y, 7))
    assert log[-1][0] == "wrapper" and go.at is None and go.device is None


@pytest.mark.parametrize("meta", [None, dict(swizzle=128, elem_size=1, elem_type=5,
                                             block_size=[16, 32], fp4_padded=True)])
def test_descriptor_layouts_it_does_not_know_keep_the_wrapper(monkeypatch, meta):
    """No encoding metadata (Triton decomposes such descriptors into pointers), or fp4
    padding: no raw launch."""
    kernel, log = _fake(monkeypatch, descriptors={0: meta})
    monkeypatch.setattr(raw_launch, "_encoding", lambda: (lambda *a: "map", {5: 50}))
    d, y = _descriptor(torch.randn(64, 32)), torch.randn(64)
    go = launch.prepare(kernel, (1,), dict(BLOCK=16), fixed=(0.5, False))
    for _ in range(2):
        go((d, y, 7))
    assert [e[0] for e in log] == ["triton", "wrapper"]
