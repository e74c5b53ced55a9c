"""launch.py: the direct launch of a compiled Triton kernel.

On the CPU there is no compiled kernel, so the direct path is tested against a stand-in for
Triton's ``JITFunction`` built from a real one's parameters: its ``run`` (Triton's own path)
records and returns a stand-in ``CompiledKernel`` whose launcher records what it receives. The
tests pin what the direct path must pass (every parameter in order, constexprs from keywords,
stream, hooks) and when it must go back to Triton (any change of specialisation). Marked
``cuda``: the direct launch equals ``kernel[grid]`` bit for bit on the real kernels.
"""

from __future__ import annotations

import types

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from attn_ops.backends.triton import launch  # noqa: E402


def _toy(X, Y, n, scale, flag, BLOCK: tl.constexpr, MODE: tl.constexpr = "a"):
    pass


class _HookChain:  # what Triton 3.6+ keeps in knobs.runtime.launch_enter_hook
    def __init__(self, calls=()):
        self.calls = list(calls)


_HookChain.__name__ = "HookChain"


@pytest.fixture
def fake(monkeypatch):
    """A JITFunction of ``_toy`` whose ``run`` is a recording stand-in, and the launch log."""
    log = []
    kernel = JITFunction(_toy)

    class Compiled:
        function, packed_metadata = "function", "packed"

        @property
        def run(self):
            return lambda *a: log.append(("direct",) + a)

        def launch_metadata(self, grid, stream, *args):
            return ("meta", grid, len(args))

    def run(*args, grid, warmup, **kw):
        log.append(("triton", args, grid, kw))
        return Compiled()

    kernel.run = run
    # runtime.device: the current device the driver's getter reports (a test may switch it)
    runtime = types.SimpleNamespace(launch_enter_hook=_HookChain(), launch_exit_hook=None,
                                    device=0)
    monkeypatch.setattr(launch, "_driver", (lambda: runtime.device,
                                            lambda device: f"stream{device}", runtime))
    launch.clear()
    yield kernel, log, runtime
    launch.clear()


def test_second_call_goes_direct_with_every_parameter_in_order(fake):
    kernel, log, _ = fake
    x, y = torch.zeros(64), torch.zeros(64)
    for _ in range(3):
        launch.launch(kernel, (3, 2), x, y, 5, 0.5, True, MODE="b", BLOCK=32, num_warps=4)
    assert log[0] == ("triton", (x, y, 5, 0.5, True), (3, 2),
                      {"MODE": "b", "BLOCK": 32, "num_warps": 4})
    direct = ("direct", 3, 2, 1, "stream0", "function", "packed", None, None, None,
              x, y, 5, 0.5, True, 32, "b")  # constexprs in parameter order, not keyword order
    assert log[1] == log[2] == direct
    # A default constexpr left out is passed with its default value.
    launch.launch(kernel, (1,), x, y, 5, 0.5, True, BLOCK=32)
    launch.launch(kernel, (1,), x, y, 5, 0.5, True, BLOCK=32)
    assert log[-1][-2:] == (32, "a") and log[-1][1:4] == (1, 1, 1)


@pytest.mark.parametrize("change", ["int_one", "int_16", "int64", "align", "dtype", "constexpr",
                                    "option", "float_to_int", "device"])
def test_any_change_of_specialisation_goes_back_to_triton(fake, change, monkeypatch):
    kernel, log, runtime = fake
    x, y = torch.zeros(64), torch.zeros(64)
    args, kw = [x, y, 5, 0.5, True], dict(BLOCK=32, num_warps=4)
    launch.launch(kernel, (1,), *args, **kw)
    launch.launch(kernel, (1,), *args, **kw)
    same = {"int_one": 7, "int_16": 3}  # the same class of int: still direct
    if change in same:
        args[2] = same[change]
        launch.launch(kernel, (1,), *args, **kw)
        assert log[-1][0] == "direct"
    if change == "int_one":
        args[2] = 1
    elif change == "int_16":
        args[2] = 32
    elif change == "int64":
        args[2] = 2 ** 33
    elif change == "align":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        args[1] = y.half()
    elif change == "constexpr":
        kw["BLOCK"] = 64
    elif change == "option":
        kw["num_warps"] = 8
    elif change == "float_to_int":
        args[3] = 1
    elif change == "device":
        monkeypatch.setattr(launch, "_driver", (lambda: 1, lambda d: f"stream{d}", runtime))
    launch.launch(kernel, (1,), *args, **kw)
    assert log[-1][0] == "triton"
    launch.launch(kernel, (1,), *args, **kw)
    assert log[-1][0] == "direct"


def test_hooks_get_what_triton_gives_them(fake):
    kernel, log, runtime = fake
    x = torch.zeros(64)
    launch.launch(kernel, (2,), x, x, 5, 0.5, True, BLOCK=32)
    runtime.launch_enter_hook = _HookChain([print])
    launch.launch(kernel, (2,), x, x, 5, 0.5, True, BLOCK=32)
    entry = log[-1]
    assert entry[7] == ("meta", (2,), 7) and entry[8] is runtime.launch_enter_hook


def test_grid_functions_and_unknown_arguments_use_triton(fake):
    kernel, log, _ = fake
    x = torch.zeros(64)
    for _ in range(2):
        launch.launch(kernel, lambda meta: (1,), x, x, 5, 0.5, True, BLOCK=32)
        launch.launch(kernel, (1,), x, x, (5, 6), 0.5, True, BLOCK=32)
    assert [e[0] for e in log] == ["triton"] * 4


def test_a_bound_signature_pins_each_launch_of_the_call(fake):
    kernel, log, _ = fake
    other = JITFunction(_toy)
    other.run = kernel.run
    x, y = torch.zeros(64), torch.zeros(64)

    def wrapper(x, grid=(4,)):
        launch.launch(kernel, grid, x, y, 5, 0.5, True, BLOCK=32)
        launch.launch(other, (1,), x, y, 7, 0.5, True, BLOCK=64)
        return "done"

    bound = launch.bind_signature(wrapper)
    assert bound(x) == "done"
    assert [e[0] for e in log] == ["triton", "triton"] and len(bound.launches) == 2
    before = dict(launch.stats)
    assert bound(torch.zeros(64)) == "done"
    assert [e[0] for e in log[2:]] == ["direct", "direct"]
    assert log[2][-2:] == (32, "a") and log[3][-2:] == (64, "a") and log[3][12] == 7
    assert launch.stats["direct"] == before["direct"] + 2
    bound(torch.zeros(65)[1:])  # misaligned: back to the keyed path
    assert [e[0] for e in log[4:]] == ["triton", "triton"]
    bound(x, grid=(8,))  # another grid than the pinned one: keyed (a known key: direct)
    assert log[-2][0] == "direct" and log[-2][1] == 8


def _run_op(op: str, device: str, bound: bool):
    """Three calls of the Triton backend's ``op`` (bound to its signature, or plain), each with
    fresh data; a misaligned (4-byte offset) key/q view in the second (the keyed path), an
    aligned one again in the third (a pinned, direct launch). Returns the outputs."""
    from attn_ops import contract
    from attn_ops.backends import triton as backend
    from tests.support.helpers import cu_seqlens, random_paged
    torch.manual_seed(1)  # random_paged draws from the global generator
    gen = torch.Generator().manual_seed(1)
    outs, fn = [], None
    for offset in (0, 1, 0):
        if op == "store_kvcache":
            big = torch.randn(14, 2, 32, generator=gen)
            key = big.view(-1)[offset:offset + 13 * 64].view(13, 2, 32).to(device)
            slots = torch.randperm(40, generator=gen)[:13].to(device)
            slots[3] = -1
            caches = [torch.randn(5, 8, 2, 32, generator=gen).to(device) for _ in range(2)]
            args = (key, key * 2, *caches, slots)
            cfg = contract.store_config(key, caches[0], slots)
        elif op == "decode":
            pb = random_paged([5, 12], 2, 32, 4, torch.float32, device=device)
            big = torch.randn(2 * 4 * 32 + 1, generator=gen).to(device)
            q = big[offset:offset + 2 * 4 * 32].view(2, 4, 32)
            seqlens = torch.tensor([5, 12], dtype=torch.int32, device=device)
            args = (q, pb.k_cache, pb.v_cache, seqlens, pb.block_table, 0.3)
            cfg = contract.decode_config(q, pb.k_cache)
        else:
            big = torch.randn(9 * 4 * 32 + 1, generator=gen).to(device)
            q = big[offset:offset + 9 * 4 * 32].view(9, 4, 32)
            k = torch.randn(9, 2, 32, generator=gen).to(device)
            cu = cu_seqlens([4, 5], device=device)
            args = (q, k, k * 0.5, cu, cu, 5, 5, 0.3)
            cfg = contract.prefill_config(q, k)
        if fn is None:
            fn = backend.bind(cfg) if bound and device == "cuda" else \
                (launch.bind_signature(getattr(backend, op)) if bound else getattr(backend, op))
        out = fn(*args)
        outs += [args[2], args[3]] if op == "store_kvcache" else [out]
    return outs


@pytest.mark.parametrize("op", ["store_kvcache", "decode", "prefill"])
def test_bound_function_equals_plain_function_in_the_interpreter(op):
    """CI: the bound path (signature context, pinned launches) computes what the plain backend
    function computes, bit for bit, on the Triton interpreter."""
    from attn_ops.backends.triton import common
    if not common.INTERPRET:
        pytest.skip("compiled Triton: the cuda test covers it")
    for a, b in zip(_run_op(op, "cpu", bound=True), _run_op(op, "cpu", bound=False)):
        assert torch.equal(a, b)


def test_interpreter_launch_is_kernel_grid():
    """Under the interpreter (CI) launch() is kernel[grid](...): the store kernel writes the same
    cache either way."""
    from attn_ops.backends.triton import store_kernel
    if not store_kernel.INTERPRET:
        pytest.skip("compiled Triton: covered by the cuda test")
    key = torch.randn(13, 2, 32)
    slots = torch.randperm(40)[:13]
    slots[3] = -1
    caches = [torch.randn(5, 8, 2, 32) for _ in range(2)]
    out_a = [c.clone() for c in caches]
    store_kernel.store_kvcache(key, key, *out_a, slots)
    assert not hasattr(store_kernel._store_kvcache_kernel, "device_caches")
    ref = [c.clone() for c in caches]
    flat = ref[0].view(-1, 2, 32)
    keep = slots >= 0
    flat[slots[keep]] = key[keep]
    assert torch.equal(out_a[0], ref[0])


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["store_kvcache", "decode", "prefill"])
def test_bound_launch_equals_triton_launch_on_the_gpu(op, monkeypatch):
    """The backend's bound function (pinned launches from the second call on) writes exactly
    what Triton's own launch path (kernel[grid]) writes, also for a 4-byte-offset view."""
    out_bound = _run_op(op, "cuda", bound=True)
    monkeypatch.setattr(launch, "enabled", False)
    out_plain = _run_op(op, "cuda", bound=False)
    for a, b in zip(out_bound, out_plain):
        assert torch.equal(a, b)
    assert launch.stats["direct"] > 0


def test_a_prepared_launch_goes_direct_and_checks_only_the_given_tensors(fake):
    """launch.prepare: first call through Triton, then the launcher with every parameter in
    order; a misaligned checked tensor, a device change or a hook leave the direct path."""
    kernel, log, runtime = fake
    x, y = torch.zeros(64), torch.zeros(64)
    go = launch.prepare(kernel, (3,), dict(BLOCK=32, num_warps=4), check=(0,))
    go((x, y, 5, 0.5, True))
    go((torch.zeros(64), y, 5, 0.5, True))
    assert [e[0] for e in log] == ["triton", "direct"]
    assert log[1] == ("direct", 3, 1, 1, "stream0", "function", "packed", None, None, None,
                      log[1][10], y, 5, 0.5, True, 32, "a")
    go((torch.zeros(65)[1:], y, 5, 0.5, True))  # the checked tensor misaligned: keyed path
    assert log[-1][0] == "triton"
    runtime.launch_enter_hook = _HookChain([print])
    go((x, y, 5, 0.5, True))
    assert log[-1][0] == "direct" and log[-1][7] == ("meta", (3,), 7)
    runtime.launch_enter_hook = _HookChain()
    runtime.device = 1  # another current device
    go((x, y, 5, 0.5, True))
    assert log[-1][0] == "triton"


def test_a_prepared_launch_joins_the_fixed_arguments_in_order(fake):
    """prepare(..., fixed=...): the caller passes the tensors, the signature's scalars follow
    them on every path (Triton's run, the direct launcher, a hook's metadata)."""
    kernel, log, runtime = fake
    x, y = torch.zeros(64), torch.zeros(64)
    go = launch.prepare(kernel, (2, 3), dict(BLOCK=16, MODE="b"), fixed=(7, 0.25, False))
    go((x, y))
    go((y, x))
    assert log[0][0] == "triton" and log[0][1] == (x, y, 7, 0.25, False)
    assert log[0][2] == (2, 3) and log[0][3] == dict(BLOCK=16, MODE="b")
    assert log[1][0] == "direct" and log[1][1:4] == (2, 3, 1)
    assert log[1][10:] == (y, x, 7, 0.25, False, 16, "b")
    runtime.launch_enter_hook = _HookChain([print])
    go((x, y))
    assert log[-1][0] == "direct" and log[-1][7] == ("meta", (2, 3), 7)
    assert log[-1][10:] == (x, y, 7, 0.25, False, 16, "b")
    launch.enabled = False
    try:
        go((x, y))  # disabled: kernel[grid] with every argument
    finally:
        launch.enabled = True
    assert log[-1][0] == "triton" and log[-1][1] == (x, y, 7, 0.25, False)


def test_the_pinned_device_getter_is_torch_c_for_torch_cuda_current_device():
    """Triton's getter is torch.cuda.current_device (a Python lazy-init check per call); a
    pinned launch calls torch's C getter instead, any other getter as it is."""
    other = lambda: 3  # noqa: E731
    assert launch._device_getter(other) is other
    raw = getattr(torch._C, "_cuda_getDevice", None)
    expected = raw if raw is not None else torch.cuda.current_device
    assert launch._device_getter(torch.cuda.current_device) is expected


def test_a_host_tma_descriptor_is_keyed_by_all_but_its_base_address():
    """Two descriptors over different bases with the same fields share a specialisation; one
    field changed (block shape, strides, dtype) does not; a traced base marks the launch as
    traced, a real one does not."""
    gluon_hopper = pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from triton.experimental.gluon import language as gl
    layout = gl.NVMMASharedLayout.get_default_for([16, 32], gl.bfloat16)

    def desc(x, block=(16, 32)):
        return gluon_hopper.TensorDescriptor(x, list(x.shape), list(x.stride()), list(block),
                                             layout)
    a, b = torch.randn(64, 32).to(torch.bfloat16), torch.randn(64, 32).to(torch.bfloat16)
    assert launch._arg_key((desc(a), 3)) == launch._arg_key((desc(b), 3))
    assert launch._arg_key((desc(a),)) != launch._arg_key((desc(a, (32, 32)),))
    wide = torch.randn(64, 64).to(torch.bfloat16)[:, :32]
    assert launch._arg_key((desc(a),)) != launch._arg_key((desc(wide),))
    assert launch._arg_key((desc(a.half()),)) != launch._arg_key((desc(a),))
    assert not launch._traced(desc(a))
    from torch._subclasses.fake_tensor import FakeTensorMode
    fake = FakeTensorMode().from_tensor(a)  # judged by its type, outside the mode
    assert launch._traced(desc(fake)) and not launch._traced(a)
