"""Decode and store as programmatic dependent launches (common.LAUNCH_PDL): which launches ask
for it, and, marked ``cuda``, that each still sees everything the kernel before it wrote (its
``griddepcontrol.wait`` comes before any load), eager and replayed from a CUDA graph."""

from __future__ import annotations

import inspect

import pytest
import torch

from attn_ops.backends import reference
from tests.support.helpers import TOLERANCES, assert_close, random_paged

triton = pytest.importorskip("triton")
from attn_ops.backends.triton import (common, decode_balanced_kernel,  # noqa: E402
                                      decode_kernel, store_kernel, unified_plan)

BF16 = torch.bfloat16


def _constexprs(kernel) -> set[str]:
    params = inspect.signature(kernel.fn).parameters  # jit or interpreted
    return {name for name, p in params.items() if "constexpr" in str(p.annotation)}


def test_pdl_launch_keywords():
    assert common.pdl_launch(True) == {"PDL": True, "launch_pdl": True}
    assert common.pdl_launch(False) == {"PDL": False}  # no option: Triton's default launch
    # Every kernel launched so has the constexpr (Inductor's launch of a traced call gives each
    # one; launch.launch drops ``launch_pdl`` there, which Inductor does not take)
    for kernel in (decode_kernel._decode_split_kernel,
                   decode_balanced_kernel.decode_balanced_kernel,
                   store_kernel._store_kvcache_kernel):
        assert "PDL" in _constexprs(kernel), kernel
    # The interpreter and CPU tensors never ask for it
    assert not common.device_has_pdl(torch.device("cpu"))


@pytest.mark.parametrize("cuda, capability, has", [
    ("13.0", (9, 0), True), ("12.3", (10, 0), True), ("12.2", (9, 0), False),
    ("12.8", (8, 9), False), (None, (9, 0), False)])
def test_which_devices_have_pdl(monkeypatch, cuda, capability, has):
    # sm90 and later, built with CUDA 12.3 or later (stream capture records the dependency)
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(common, "_capability", lambda index: capability)
    common._cuda_version.cache_clear()
    try:
        assert common.device_has_pdl(torch.device("cuda", 0)) is has
    finally:
        common._cuda_version.cache_clear()


@pytest.mark.parametrize("pdl", [True, False])
def test_plans_ask_for_pdl_where_the_device_has_it(monkeypatch, pdl):
    monkeypatch.setattr(decode_kernel, "device_has_pdl", lambda device: True)
    monkeypatch.setattr(store_kernel, "device_has_pdl", lambda device: True)
    monkeypatch.setattr(unified_plan, "device_has_pdl", lambda device: True)
    monkeypatch.setattr(common, "LAUNCH_PDL", pdl)
    decode_kernel._plan.cache_clear()
    unified_plan.balanced_plan.cache_clear()
    cpu = torch.device("cpu")
    try:
        for balanced in (False, True):
            plan = decode_kernel._plan(16, 32, 8, 128, 16, 128, BF16, cpu, False, False, None,
                                       None, True, BF16, True, False, balanced, None, pdl)
            stage1 = plan[4]
            assert stage1["PDL"] is pdl and ("launch_pdl" in stage1) is pdl
        key = torch.randn(4, 2, 32)
        cache = torch.zeros(8, 16, 2, 32)
        _, consts, _ = store_kernel._launch_args(key, key, cache, cache,
                                                 torch.arange(4, dtype=torch.int32), None)
        assert consts["PDL"] is pdl and ("launch_pdl" in consts) is pdl
        monkeypatch.setattr(unified_plan, "INTERPRET", False)
        monkeypatch.setattr(unified_plan, "device_sm_count", lambda device: 132)
        few = unified_plan.balanced_plan(16, 32, 8, 128, 4, 8192, BF16, cpu, True, True, False,
                                         False, None)
        assert few[1]["PDL"] is pdl and ("launch_pdl" in few[1]) is pdl
    finally:
        decode_kernel._plan.cache_clear()
        unified_plan.balanced_plan.cache_clear()
    # Not where the device lacks it, whatever LAUNCH_PDL says
    monkeypatch.setattr(decode_kernel, "device_has_pdl", lambda device: False)
    stage1 = decode_kernel._plan(16, 32, 8, 128, 16, 128, BF16, cpu, False, False, None, None,
                                 True, BF16, True, False, None, None, True)[4]
    decode_kernel._plan.cache_clear()
    assert stage1["PDL"] is False and "launch_pdl" not in stage1


def test_traced_launches_are_plain(monkeypatch):
    # Inside a triton_op being traced, a launch becomes Inductor's (wrap_triton), which takes no
    # launch_pdl: the kernel is built without its wait too, whose inline asm Inductor's
    # analysis of what a kernel mutates cannot read (it gave wrong outputs on the H200)
    from attn_ops.backends.triton import launch
    seen = []
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: type(
        "Launcher", (), {"__getitem__": lambda self, grid: lambda *a, **k: seen.append(k)})())
    traced = torch.nn.Parameter(torch.zeros(2))  # a subclass: launch() takes it as traced
    launch.launch(decode_kernel._decode_split_kernel, (1,), traced, BLOCK_N=16,
                  **common.pdl_launch(True))
    launch.launch(decode_kernel._decode_split_kernel, (1,), traced, BLOCK_N=16,
                  **common.pdl_launch(False))
    assert seen == [{"BLOCK_N": 16, "PDL": False}] * 2


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

def _decode_steps(x, caches, table, slots, seqlens, proj, store, decode, hkv):
    """Steps of a decode loop: q from the last output (a torch kernel writes it), the new token's
    K/V from q (another), stored, then attended over with the token just stored."""
    outs = []
    b, h, d = x.shape
    for slot, lens in zip(slots, seqlens):
        q = torch.tanh(x * 1.5 + 0.1)
        kv = q.view(b, hkv, h // hkv, d).mean(2) @ proj
        store(kv[..., :d].contiguous(), kv[..., d:].contiguous(), *caches, slot)
        x = decode(q, *caches, lens, table, d ** -0.5)
        outs.append(x)
    return torch.stack(outs)


@pytest.mark.cuda
@pytest.mark.parametrize("graph", [False, True])
def test_dependent_launches_see_the_kernel_before_them_cuda(graph):
    # 6 steps over 6 sequences (one padded: slot -1, length 0), pages of 16: each step's store
    # follows the torch kernels that computed its rows, and each decode the store whose token
    # it must see. A dependent launch that read before its wait would see the cache's old
    # (random) row at that slot, or a stale q.
    if not common.device_has_pdl(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm90 or later")
    torch.manual_seed(0)
    lens, steps, page, h, hkv, d = [1, 17, 130, 0, 1000, 257], 6, 16, 8, 2, 128
    paged = random_paged([n + steps if n else 0 for n in lens], hkv, d, page, BF16, "cuda")
    table = paged.block_table
    host_table = table.cpu()
    slots, seqlens = [], []
    for i in range(steps):
        pos = [n + i for n in lens]
        slots.append(torch.tensor([int(host_table[b, p // page]) * page + p % page if lens[b]
                                   else -1 for b, p in enumerate(pos)], dtype=torch.int32,
                                  device="cuda"))
        seqlens.append(torch.tensor([p + 1 if lens[b] else 0 for b, p in enumerate(pos)],
                                    dtype=torch.int32, device="cuda"))
    proj = torch.randn(d, 2 * d, device="cuda", dtype=BF16) * d ** -0.5
    x0 = torch.randn(len(lens), h, d, device="cuda", dtype=BF16)
    ref_caches = (paged.k_cache.clone(), paged.v_cache.clone())
    ref = _decode_steps(x0, ref_caches, table, slots, seqlens, proj, reference.store_kvcache,
                        reference.decode, hkv)

    caches = (paged.k_cache, paged.v_cache)
    originals = tuple(c.clone() for c in caches)
    plan = decode_kernel._plan(len(lens), h, hkv, d, page, table.shape[1], BF16,
                               torch.device("cuda", torch.cuda.current_device()), False, False,
                               None, None, True, BF16, True, False, None, None, True)
    assert plan[4]["launch_pdl"], "the decode is not launched as a dependent here"

    def run():
        return _decode_steps(x0, caches, table, slots, seqlens, proj,
                             lambda *a: store_kernel.store_kvcache(*a, pdl=True),
                             lambda *a: decode_kernel.decode(*a, pdl=True), hkv)
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()  # compiles and warms up (writes the same rows the replay will)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = run()
        for c, o in zip(caches, originals):
            c.copy_(o)  # the replay's stores must be what its decodes see
        g.replay()
    else:
        out = run()
    torch.cuda.synchronize()
    assert torch.isfinite(out[:, [0, 1, 2, 4, 5]]).all()
    assert torch.all(out[:, 3] == 0), "the padded sequence sees no key"
    assert_close(out, ref, *TOLERANCES[BF16], what="decode steps")
    for c, r in zip(caches, ref_caches):  # rows from outputs that agree to bf16's rounding
        assert_close(c, r, *TOLERANCES[BF16], what="the stores")
