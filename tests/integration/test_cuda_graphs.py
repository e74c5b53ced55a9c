"""CUDA graphs and AOTInductor on a GPU: store + decode captured once, replayed with new lengths,
block tables and slots, never copying the KV cache. Run with ``pytest -m cuda``.

* ``torch.compile(DecodeStep, mode="reduce-overhead")`` (caches are module buffers, which Dynamo
  marks static, so cudagraph trees accept their mutation): no cudagraph skip, outputs served from
  the graph's static pool, generated code without a cache copy, and the steps' peak memory below
  one cache.
* A hand-captured ``torch.cuda.CUDAGraph`` of ``attn.store_kvcache`` + ``attn.decode``, replayed
  while sequences grow, join and leave (auto backend and the reference backend).
* A function taking the caches as arguments under reduce-overhead, after
  ``torch._dynamo.mark_static_address`` (without it cudagraph trees would skip: mutated input).
* AOTInductor CUDA packages of both example steps bound to the same caches, and the export
  example on CUDA.
Every output is compared with eager mode on the reference backend; comparisons reject NaN.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import attn_ops
from attn_ops import PagedKVCache
from tests.support.capture import (assert_schedule_matches, cache_copies, compile_step_packages,
                             eager_reference, make_layer, package_sources, pam, plan_schedule,
                             run_schedule)
from tests.support.helpers import TOLERANCES, assert_close

pytestmark = pytest.mark.cuda
DEV = "cuda"
DTYPE = torch.float16
# 134M elements (256 MiB in fp16) per cache: the peak-memory checks allow less than one cache
# per step, which any copy of a cache exceeds, while a decode step's own buffers are a few KiB
# and the cuBLAS workspaces that new (capture) streams allocate are 32 MiB each on Hopper.
GPU_CFG = pam.LayerConfig(hidden=64, num_heads=8, num_kv_heads=2, head_dim=64,
                          num_blocks=65536, block_size=16, dtype=DTYPE)
ROWS = 4  # decode batch padded to a fixed row count: one captured shape serves every step
MAX_SEQ_LEN = 256  # block-table width 16
# Attention alone: fp16 kernels vs the fp32-softmax reference. The whole layer adds two fp16
# projections around it, so its outputs get 1e-2 (errors ~1e-3 observed on CPU-sized models).
ATTN_TOL = TOLERANCES[DTYPE]
LAYER_TOL = (1e-2, 1e-2)


@pytest.fixture(autouse=True)
def _fresh_state():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 runs the interpreter; these tests need compiled kernels")
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _cache_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------
# A decode workload: sequences prefilled eagerly, then decode steps whose lengths, tables and
# slots change every step (a sequence joins at step 2, another leaves at step 4)
# ---------------------------------------------------------------------------------------------

class DecodeWorkload:
    def __init__(self, cfg=GPU_CFG, seed=0):
        self.cfg = cfg
        self.gen = torch.Generator(device=DEV).manual_seed(seed)
        self.planner = PagedKVCache(cfg.num_blocks, cfg.block_size, cfg.num_kv_heads,
                                    cfg.head_dim, max_seq_len=MAX_SEQ_LEN, dtype=cfg.dtype,
                                    device=DEV)
        self.active = []

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen, device=DEV, dtype=self.cfg.dtype)

    def admit(self, seq_id, prompt_len, k_caches, v_caches):
        """Store a prompt's random K/V into every given cache pair (the prefill's writes)."""
        batch = self.planner.prepare_prefill({seq_id: prompt_len})
        k = self.randn(prompt_len, self.cfg.num_kv_heads, self.cfg.head_dim)
        v = self.randn(prompt_len, self.cfg.num_kv_heads, self.cfg.head_dim)
        for kc, vc in zip(k_caches, v_caches):
            torch.ops.attn.store_kvcache(k, v, kc, vc, batch.slot_mapping)
        self.active.append(seq_id)

    def leave(self, seq_id):
        self.active.remove(seq_id)
        self.planner.free(seq_id)

    def decode_batch(self):
        return self.planner.prepare_decode(self.active, pad_to=ROWS)


def _run_decode_schedule(work, caches, step_fn):
    """Prompts a (37 tokens), b (5), c (123); six decode steps; d (64) joins before step 2, b
    leaves before step 4. ``step_fn(batch)`` runs one step. Returns its results."""
    for seq_id, n in (("a", 37), ("b", 5), ("c", 123)):
        work.admit(seq_id, n, *caches)
    results = []
    for step in range(6):
        if step == 2:
            work.admit("d", 64, *caches)
        if step == 4:
            work.leave("b")
        results.append(step_fn(step, work.decode_batch()))
    return results


# ---------------------------------------------------------------------------------------------
# torch.compile(mode="reduce-overhead")
# ---------------------------------------------------------------------------------------------

def test_reduce_overhead_decode_step_module():
    work = DecodeWorkload()
    shape = (GPU_CFG.num_blocks, GPU_CFG.block_size, GPU_CFG.num_kv_heads, GPU_CFG.head_dim)
    k_cache = torch.randn(shape, device=DEV, dtype=DTYPE)
    v_cache = torch.randn(shape, device=DEV, dtype=DTYPE)
    layer = make_layer(k_cache, v_cache, GPU_CFG)
    twin = make_layer(k_cache.clone(), v_cache.clone(), GPU_CFG)  # same seeded weights
    compiled = torch.compile(pam.DecodeStep(layer), mode="reduce-overhead", fullgraph=True)
    codes, ptrs = [], []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()

    def step(i, batch):
        x = work.randn(ROWS, GPU_CFG.hidden)
        args = pam.decode_inputs(batch, x)
        torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            if i == 0:
                out, code = run_and_get_code(compiled, *args)
                codes.extend(code)
            else:
                out = compiled(*args)
            ptrs.append(out.data_ptr())
            out = out.clone()
            with attn_ops.use_backend("reference"):
                want = pam.DecodeStep(twin)(*args)
        assert_close(out, want, *LAYER_TOL, what=f"decode step {i}")
        return out

    _run_decode_schedule(work, ([k_cache, twin.k_cache], [v_cache, twin.v_cache]), step)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    # Steps 0-1 warm up and record; from then on every output lives at the graph's one static
    # address: the steps replayed a CUDA graph.
    assert len(set(ptrs[2:])) == 1, ptrs
    assert layer.k_cache is k_cache
    # The stored K/V are fp16 projections computed by compiled and by eager code.
    assert_close(k_cache, twin.k_cache, *LAYER_TOL, what="k_cache after the schedule")
    assert_close(v_cache, twin.v_cache, *LAYER_TOL, what="v_cache after the schedule")
    found = [line for code in codes for line in cache_copies(code, k_cache.numel())]
    assert not found, "generated code copies a cache:\n" + "\n".join(found)
    assert peak < _cache_bytes(k_cache), \
        f"peak {peak / 2**20:.1f} MiB during the steps; one cache is " \
        f"{_cache_bytes(k_cache) / 2**20:.0f} MiB"


def _store_then_decode(q, k, v, k_cache, v_cache, slot_mapping, seqlens_k, block_table):
    torch.ops.attn.store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    return torch.ops.attn.decode(q, k_cache, v_cache, seqlens_k, block_table,
                                 GPU_CFG.head_dim ** -0.5)


def test_reduce_overhead_with_caches_as_static_inputs():
    work = DecodeWorkload(seed=1)
    shape = (GPU_CFG.num_blocks, GPU_CFG.block_size, GPU_CFG.num_kv_heads, GPU_CFG.head_dim)
    k_cache = torch.randn(shape, device=DEV, dtype=DTYPE)
    v_cache = torch.randn(shape, device=DEV, dtype=DTYPE)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    # Mutated graph inputs must be static for cudagraph trees; buffers are marked for us.
    torch._dynamo.mark_static_address(k_cache)
    torch._dynamo.mark_static_address(v_cache)
    compiled = torch.compile(_store_then_decode, mode="reduce-overhead", fullgraph=True)
    h, hkv, d = GPU_CFG.num_heads, GPU_CFG.num_kv_heads, GPU_CFG.head_dim
    codes = []

    def step(i, batch):
        q, k, v = work.randn(ROWS, h, d), work.randn(ROWS, hkv, d), work.randn(ROWS, hkv, d)
        meta = (batch.slot_mapping, batch.seqlens_k, batch.block_table)
        torch.compiler.cudagraph_mark_step_begin()
        if i == 0:
            out, code = run_and_get_code(compiled, q, k, v, k_cache, v_cache, *meta)
            codes.extend(code)
        else:
            out = compiled(q, k, v, k_cache, v_cache, *meta)
        out = out.clone()
        with attn_ops.use_backend("reference"):
            want = _store_then_decode(q, k, v, ref_k, ref_v, *meta)
        assert_close(out, want, *ATTN_TOL, what=f"decode step {i}")

    _run_decode_schedule(work, ([k_cache, ref_k], [v_cache, ref_v]), step)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert_close(k_cache, ref_k, *ATTN_TOL, what="k_cache")
    found = [line for code in codes for line in cache_copies(code, k_cache.numel())]
    assert not found, "generated code copies a cache:\n" + "\n".join(found)


# ---------------------------------------------------------------------------------------------
# Hand-captured torch.cuda.CUDAGraph
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_hand_captured_graph_replays_new_lengths_tables_slots(backend):
    work = DecodeWorkload(seed=2)
    h, hkv, d = GPU_CFG.num_heads, GPU_CFG.num_kv_heads, GPU_CFG.head_dim
    shape = (GPU_CFG.num_blocks, GPU_CFG.block_size, hkv, d)
    k_cache = torch.randn(shape, device=DEV, dtype=DTYPE)
    v_cache = torch.randn(shape, device=DEV, dtype=DTYPE)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    for seq_id, n in (("a", 37), ("b", 5), ("c", 123)):
        work.admit(seq_id, n, [k_cache, ref_k], [v_cache, ref_v])

    # Static inputs the graph reads; each replay copies a new step into them.
    first = work.decode_batch()
    static = {"q": work.randn(ROWS, h, d), "k": work.randn(ROWS, hkv, d),
              "v": work.randn(ROWS, hkv, d), "slots": first.slot_mapping.clone(),
              "lens": first.seqlens_k.clone(), "table": first.block_table.clone()}

    def captured_step():
        return _store_then_decode(static["q"], static["k"], static["v"], k_cache, v_cache,
                                  static["slots"], static["lens"], static["table"])

    with attn_ops.use_backend(backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, the data checks run here
            for _ in range(2):
                captured_step()
        torch.cuda.current_stream().wait_stream(side)
        # The warm-up stored step 0's token twice; replay the same writes on the reference.
        _store_then_decode(static["q"], static["k"], static["v"], ref_k, ref_v, static["slots"],
                           static["lens"], static["table"])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = captured_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()

    def step(i, batch):
        for name, new in (("q", work.randn(ROWS, h, d)), ("k", work.randn(ROWS, hkv, d)),
                          ("v", work.randn(ROWS, hkv, d)), ("slots", batch.slot_mapping),
                          ("lens", batch.seqlens_k), ("table", batch.block_table)):
            static[name].copy_(new)
        static_out.fill_(float("nan"))  # a replay that writes nothing shows as NaN
        graph.replay()
        with attn_ops.use_backend("reference"):
            want = _store_then_decode(static["q"], static["k"], static["v"], ref_k, ref_v,
                                      static["slots"], static["lens"], static["table"])
        assert_close(static_out, want, *ATTN_TOL, what=f"replay {i}")
        # Padded rows (slot -1, length 0) return zeros.
        assert torch.all(static_out[len(batch.seq_ids):] == 0)

    # The captured batch was step 0's; every replay's lengths, slots (and from replay 2 on,
    # tables) differ from it.
    for i in range(6):
        if i == 2:
            work.admit("d", 64, [k_cache, ref_k], [v_cache, ref_v])
        if i == 4:
            work.leave("b")
        step(i, work.decode_batch())
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < _cache_bytes(k_cache)
    assert_close(k_cache, ref_k, *ATTN_TOL, what="k_cache")
    assert_close(v_cache, ref_v, *ATTN_TOL, what="v_cache")


# ---------------------------------------------------------------------------------------------
# Split-KV merges fused into the last split program: graphs replayed at once on two streams
# ---------------------------------------------------------------------------------------------

def test_graphs_captured_on_one_stream_replay_at_once_on_two():
    # Decode (B 2 over ~8k keys: 8 splits) and 4-query paged prefill (split too), both merged by
    # the last split program through kept counters (split_counters.semaphores). Two graphs captured
    # on one stream, as CUDA-graph trees capture them, must not share counters: replayed at once on
    # two streams, each still gives its own eager result, every time.
    from attn_ops.backends.triton import split_counters
    from tests.support.helpers import random_paged
    bf16, lens = torch.bfloat16, [8191, 7000]
    paged = random_paged(lens, 8, 128, 16, bf16, device=DEV)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    cu_q = torch.tensor([0, 4, 8], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device=DEV)

    def step(q1, q4):
        return (torch.ops.attn.decode(q1, paged.k_cache, paged.v_cache, seqlens,
                                      paged.block_table, 0.088),
                torch.ops.attn.prefill(q4, paged.k_cache, paged.v_cache, cu_q, cu_k, 4,
                                       max(lens), 0.088, True, paged.block_table))

    inputs = [(torch.randn(2, 32, 128, device=DEV, dtype=bf16),
               torch.randn(8, 32, 128, device=DEV, dtype=bf16)) for _ in range(2)]
    graphs, outs, wants = [], [], []
    with attn_ops.use_backend("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            wants = [step(*x) for x in inputs]  # eager: compiles, fills the counter slab
        torch.cuda.current_stream().wait_stream(side)
        slab = split_counters._SLABS[torch.device(DEV, torch.cuda.current_device())]
        capture = torch.cuda.Stream()
        for x in inputs:
            used = slab.used
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=capture):
                outs.append(step(*x))
            assert slab.used > used, "a captured split launch took no counters of its own"
            graphs.append(graph)
    with attn_ops.use_backend("reference"):
        for x, want in zip(inputs, wants):
            for got, ref in zip(want, step(*x)):
                assert_close(got, ref, 2e-2, 2e-2, what="eager triton vs reference")
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for i in range(40):
        for out in outs:
            for t in out:
                t.fill_(float("nan"))
        for graph, stream in zip(graphs, streams):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                graph.replay()
        for stream in streams:
            torch.cuda.current_stream().wait_stream(stream)
        for out, want in zip(outs, wants):
            for got, ref in zip(out, want):
                assert_close(got, ref, 1e-3, 1e-3, what=f"replay {i}")


# ---------------------------------------------------------------------------------------------
# AOTInductor on CUDA
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.__version__ < "2.13",
                    reason="torch 2.11's aoti_load_package segfaults loading these CUDA packages "
                           "(in-process: it would kill the whole run; seen on an H100, 2026-11-21)")
def test_aoti_cuda_packages_bound_to_shared_caches(tmp_path):
    cfg = pam.LayerConfig(hidden=64, num_heads=8, num_kv_heads=2, head_dim=64, num_blocks=64,
                          block_size=16, dtype=DTYPE)
    steps, k0, v0 = plan_schedule(cfg)
    steps = [s.to(DEV) for s in steps]
    k0, v0 = k0.to(DEV), v0.to(DEV)
    reference = eager_reference(steps, k0, v0, cfg)
    paths = compile_step_packages(make_layer(k0.clone(), v0.clone(), cfg), steps, tmp_path)
    runners, k_cache, v_cache = {}, k0.clone(), v0.clone()
    for kind, path in paths.items():
        found = cache_copies(package_sources(path), k0.numel())
        assert not found, f"{kind} package copies a cache:\n" + "\n".join(found)
        runners[kind] = torch._inductor.aoti_load_package(path)
        pam.bind_aoti_caches(runners[kind], k_cache, v_cache)
    outs = run_schedule(runners, steps)
    assert_schedule_matches(outs, k_cache, v_cache, reference, steps, LAYER_TOL, what="bound: ")


@pytest.mark.xfail(torch.__version__ < "2.13", strict=False,
                   reason="torch 2.11's aoti_load_package segfaults loading this CUDA package "
                          "(faulthandler: torch/export/pt2_archive/_package.py _load_aoti; seen on "
                          "an H100, 2026-11-21); the CPU path of the example passes in CI")
def test_export_example_on_cuda(tmp_path):
    example = Path(__file__).resolve().parents[2] / "examples" / "export_model.py"
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(example), "--device", "cuda", "--json",
                           str(report)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(report.read_text())
    assert r["ok"] and r["device"] == "cuda" and r["max_err"] <= r["tol"]
