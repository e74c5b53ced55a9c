"""Strided KV caches: any ``[num_blocks, block_size, Hkv, D]`` view with a contiguous last dim.

store_kvcache, paged prefill, decode and their ``_with_lse`` forms on the reference, sdpa and
triton (interpreter) backends, each against the same backend on a contiguous copy of the cache.
Layouts: a dense heads-major ``[N, Hkv, bs, D]`` tensor transposed (gpt-fast's and transformers'
static cache, one block per sequence), a view into a larger buffer (padded strides and a storage
offset), and k/v with different layouts. Every storage element outside the view holds NaN, and
so does every cache slot no sequence owns: a read of either would show as NaN in the output,
and a store that wrote outside its slots would change a poisoned element.
"""

import importlib

import pytest
import torch

import attn_ops
from attn_ops.backends import reference
from tests.support.helpers import TOLERANCES, assert_close, cu_seqlens, random_paged

BACKENDS = ["reference", "sdpa", "triton"]
LAYOUTS = ["heads_major", "padded", "mixed"]  # mixed: k heads-major, v padded
NAN = float("nan")


def _strided(cache: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A non-contiguous view holding ``cache``'s values, and its NaN-filled storage tensor."""
    n, bs, hkv, d = cache.shape
    if layout == "heads_major":
        storage = torch.full((n, hkv, bs, d), NAN, dtype=cache.dtype)
        view = storage.transpose(1, 2)
    else:  # padded: 2 spare tokens per page, 1 spare head, 8 spare dims, a storage offset
        storage = torch.full((n, bs + 2, hkv + 1, d + 8), NAN, dtype=cache.dtype)
        view = storage[:, 1:bs + 1, :hkv, 4:d + 4]
    view.copy_(cache)
    assert not view.is_contiguous() and view.stride(-1) == 1
    return view, storage


def _pair(k: torch.Tensor, v: torch.Tensor, layout: str):
    """Strided views of k and v (``mixed``: different layouts) and their storages."""
    kv, ks = _strided(k, "heads_major" if layout == "mixed" else layout)
    vv, vs = _strided(v, "padded" if layout == "mixed" else layout)
    return kv, vv, ks, vs


def _poison_unowned(pb, lens: list[int]) -> None:
    """NaN in every cache slot no sequence owns (spare blocks, tails of last blocks)."""
    bs = pb.k_cache.shape[1]
    owned = torch.zeros(pb.k_cache.shape[0] * bs, dtype=torch.bool)
    for b, n in enumerate(lens):
        for p in range(n):
            owned[int(pb.block_table[b, p // bs]) * bs + p % bs] = True
    for cache in (pb.k_cache, pb.v_cache):
        cache.view(-1, *cache.shape[2:])[~owned] = NAN


def _compare(got, want, dtype, what):
    """Outputs (and lse) of the strided call against the contiguous one; no NaN in either."""
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, w, name in zip(got, want, (what, what + " lse")):
        finite = torch.isfinite(w) | (w == float("-inf"))
        assert finite.all(), f"{name}: the contiguous call read a poisoned slot"
        if name.endswith("lse"):
            assert torch.equal(g == float("-inf"), w == float("-inf")), f"{name}: -inf rows"
            g, w = g.masked_fill(w == float("-inf"), 0), w.masked_fill(w == float("-inf"), 0)
        assert_close(g, w, *TOLERANCES[dtype], what=name)


# (backend, with_lse) pairs a backend serves: the sdpa backend returns no log-sum-exp
SERVED = [(b, lse) for b in BACKENDS for lse in (False, True) if not (lse and b == "sdpa")]


@pytest.mark.parametrize("backend,with_lse", SERVED)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_reads_strided_caches(backend, layout, with_lse):
    dtype, lens = torch.bfloat16, [13, 0, 5, 1]
    pb = random_paged(lens, 2, 16, 5, dtype)
    _poison_unowned(pb, lens)
    k, v, _, _ = _pair(pb.k_cache, pb.v_cache, layout)
    q = torch.randn(4, 4, 16, dtype=dtype)  # GQA: 4 query heads on 2 kv heads
    seqlens = torch.tensor(lens, dtype=torch.int32)
    fn = attn_ops.decode_with_lse if with_lse else attn_ops.decode
    for window in (-1, 3):
        got = fn(q, k, v, seqlens, pb.block_table, 0.25, window, backend=backend)
        want = fn(q, pb.k_cache, pb.v_cache, seqlens, pb.block_table, 0.25, window,
                  backend=backend)
        _compare(got, want, dtype, f"decode {layout}, window {window}")


@pytest.mark.parametrize("backend,with_lse", SERVED)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_prefill_reads_strided_caches(backend, layout, with_lse):
    dtype, lens_q, lens_k = torch.float16, [3, 13, 1, 0], [5, 13, 4, 0]
    pb = random_paged(lens_k, 2, 16, 5, dtype)
    _poison_unowned(pb, lens_k)
    k, v, _, _ = _pair(pb.k_cache, pb.v_cache, layout)
    q = torch.randn(sum(lens_q) + 1, 4, 16, dtype=dtype)  # and one row no sequence owns
    fn = attn_ops.prefill_with_lse if with_lse else attn_ops.prefill
    args = (cu_seqlens(lens_q), cu_seqlens(lens_k), 13, 13, 0.25, True, pb.block_table)
    got = fn(q, k, v, *args, backend=backend)
    want = fn(q, pb.k_cache, pb.v_cache, *args, backend=backend)
    _compare(got, want, dtype, f"paged prefill {layout}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_transposed_dense_cache_is_one_block_per_sequence(backend):
    """gpt-fast's ``[B, Hkv, S, D]`` cache as ``cache.transpose(1, 2)``, ``block_table =
    arange(B)[:, None]``: the same result as its contiguous token-major copy, and as the
    dense prefill over each sequence's first keys."""
    b, hkv, s, d, h, dtype = 3, 2, 13, 16, 4, torch.float32
    k_dense = torch.empty(b, hkv, s, d).transpose(1, 2)
    v_dense = torch.empty(b, hkv, s, d).transpose(1, 2)
    k_dense.copy_(torch.randn(b, s, hkv, d))
    v_dense.copy_(torch.randn(b, s, hkv, d))
    table = torch.arange(b, dtype=torch.int32)[:, None]
    lens = [13, 0, 6]
    q = torch.randn(b, h, d, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    got = attn_ops.decode(q, k_dense, v_dense, seqlens, table, 0.3, backend=backend)
    want = attn_ops.decode(q, k_dense.contiguous(), v_dense.contiguous(), seqlens, table, 0.3,
                           backend=backend)
    _compare(got, want, dtype, "decode over a transposed dense cache")
    dense_k = torch.cat([k_dense[i, :n] for i, n in enumerate(lens)])
    dense_v = torch.cat([v_dense[i, :n] for i, n in enumerate(lens)])
    cu = cu_seqlens(lens)
    ones = cu_seqlens([1 if n else 0 for n in lens])
    last = attn_ops.prefill(q[[n > 0 for n in lens]], dense_k, dense_v, ones, cu, 1, s, 0.3,
                            backend="reference")
    assert_close(got[[n > 0 for n in lens]], last, *TOLERANCES[dtype], what="vs dense prefill")
    assert torch.equal(got[1], torch.zeros(h, d)), "a sequence with no key reads zeros"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` as integers (NaN poison compares equal to itself)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["reference", "reference_device_path", "sdpa", "triton"])
def test_store_writes_exactly_its_slots_through_the_strides(backend, layout, monkeypatch):
    if backend == "reference_device_path":  # the sync-free path, not the CPU host shortcut
        monkeypatch.setattr(reference, "_on_host", lambda t: False)
        backend = "reference"
    n, bs, hkv, d, t, dtype = 4, 5, 2, 16, 13, torch.bfloat16
    init_k, init_v = torch.randn(2, n, bs, hkv, d, dtype=dtype)
    k, v, k_storage, v_storage = _pair(init_k, init_v, layout)
    key, value = torch.randn(2, t, hkv, d, dtype=dtype)
    slots = torch.randperm(n * bs)[:t]
    slots[[1, 6]] = -1
    # Expected: the contiguous store, copied into a clone of the poisoned storage.
    want = []
    for init, view, storage in ((init_k, k, k_storage), (init_v, v, v_storage)):
        want.append((init.clone(), storage.clone()))
    reference.store_kvcache(key, value, want[0][0], want[1][0], slots)
    for (contig, storage), view in zip(want, (k, v)):
        storage.as_strided(view.shape, view.stride(), view.storage_offset()).copy_(contig)
    attn_ops.store_kvcache(key, value, k, v, slots, backend=backend)
    assert torch.equal(_bits(k_storage), _bits(want[0][1])), "k storage: written slots / poison"
    assert torch.equal(_bits(v_storage), _bits(want[1][1])), "v storage: written slots / poison"
    assert torch.isnan(k_storage).sum() == k_storage.numel() - k.numel(), "padding kept NaN"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fp8_store_and_decode_on_a_transposed_cache(backend):
    n, bs, hkv, d, t = 3, 8, 2, 16, 11
    storage_k = torch.full((n, hkv, bs, d), 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)
    storage_v = storage_k.clone()
    k, v = storage_k.transpose(1, 2), storage_v.transpose(1, 2)
    k_ref = torch.zeros(n, bs, hkv, d, dtype=torch.float8_e4m3fn)
    v_ref = torch.zeros_like(k_ref)
    key, value = torch.randn(2, t, hkv, d, dtype=torch.bfloat16)
    slots = torch.cat([torch.arange(8), torch.arange(16, 19)])  # sequence 0: 8, sequence 2: 3
    scales = torch.rand(hkv) + 0.5, torch.rand(()) + 0.5
    attn_ops.store_kvcache(key, value, k, v, slots, *scales, backend=backend)
    attn_ops.store_kvcache(key, value, k_ref, v_ref, slots, *scales, backend="reference")
    for got, want in ((k, k_ref), (v, v_ref)):
        got, want = got.view(torch.uint8), want.view(torch.uint8)
        assert torch.equal(got[0], want[0]) and torch.equal(got[2, :3], want[2, :3])
        assert (got[1] == 0x7F).all() and (got[2, 3:] == 0x7F).all(), "unwritten: poison kept"
    q = torch.randn(3, 4, d, dtype=torch.bfloat16)
    table = torch.arange(n, dtype=torch.int32)[:, None]
    seqlens = torch.tensor([8, 0, 3], dtype=torch.int32)
    got = attn_ops.decode(q, k, v, seqlens, table, 0.25, k_scale=scales[0], v_scale=scales[1],
                          backend=backend)
    want = attn_ops.decode(q, k_ref, v_ref, seqlens, table, 0.25, k_scale=scales[0],
                           v_scale=scales[1], backend=backend)
    _compare(got, want, torch.bfloat16, "fp8 decode over a transposed cache")


def test_a_strided_last_dim_is_refused_at_eager_and_trace_time():
    k = torch.randn(2, 4, 16, 2).transpose(2, 3)  # [2, 4, 2, 16] with stride(-1) == 2
    args = (torch.randn(2, 4, 16), k, torch.randn(2, 4, 2, 16), torch.tensor([3, 4],
            dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32), 0.25)
    with pytest.raises(ValueError, match=r"k_cache: .* last dim \(D\) is contiguous"):
        attn_ops.decode(*args)
    torch._dynamo.reset()
    fn = torch.compile(torch.ops.attn.decode.default, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=r"last dim \(D\) is contiguous"):
        fn(*args)


def test_compiled_decode_over_a_transposed_cache_has_no_copy():
    """Under torch.compile the fake kernel takes the strided view as it is (no copy node)."""
    cache = torch.randn(2, 2, 13, 16)
    table = torch.arange(2, dtype=torch.int32)[:, None]

    def step(q, k, v, lens):
        return torch.ops.attn.decode(q, k.transpose(1, 2), v.transpose(1, 2), lens, table, 0.25)

    q, lens = torch.randn(2, 4, 16), torch.tensor([13, 4], dtype=torch.int32)
    torch._dynamo.reset()
    with attn_ops.use_backend("reference"):
        got = torch.compile(step, backend="inductor", fullgraph=True)(q, cache, cache, lens)
        want = step(q, cache.transpose(1, 2).contiguous().transpose(1, 2), cache, lens)
    assert_close(got, want, *TOLERANCES[torch.float32])


def test_flash_refuses_strided_caches():
    """FlashAttention gets contiguous caches only (npu: tests/attn_ops/backends/npu)."""
    from attn_ops.backends import flash
    k = torch.empty(2, 2, 256, 16, dtype=torch.float16).transpose(1, 2)
    q = torch.empty(2, 4, 16, dtype=torch.float16)
    config = attn_ops.decode_config(q, k, v_cache=k)
    assert not config.cache_contiguous
    assert "not contiguous" in flash.choose(config, (9, 0), ())[1]
    assert attn_ops.decode_config(q, k.contiguous(), v_cache=k.contiguous()).cache_contiguous
    assert not attn_ops.decode_config(q, k.contiguous(), v_cache=k).cache_contiguous


class _CacheCopies(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that copies a tensor sharing ``storage`` whole (clone, contiguous,
    a reshape that cannot view); gathers of the rows asked for are not copies of the cache."""

    def __init__(self, storage: torch.Tensor):
        super().__init__()
        self.ptr, self.copies, self.seen = storage.untyped_storage().data_ptr(), [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.seen.append(name)
        if name in ("clone", "_to_copy", "copy_", "contiguous", "_unsafe_view") and any(
                isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == self.ptr
                for a in args):
            self.copies.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_reads_and_writes_never_copy_the_cache(backend):
    """The backend functions themselves (a dispatch mode sees the aten ops inside a custom op
    only when it is called directly)."""
    module = importlib.import_module(f"attn_ops.backends.{backend}")
    k, k_storage = _strided(torch.randn(2, 24, 2, 16), "heads_major")
    v, v_storage = _strided(torch.randn(2, 24, 2, 16), "padded")
    table = torch.arange(2, dtype=torch.int32)[:, None]
    q, key = torch.randn(2, 4, 16), torch.randn(2, 2, 16)
    for storage in (k_storage, v_storage):
        mode = _CacheCopies(storage)
        with mode:
            module.store_kvcache(key, key, k, v, torch.tensor([3, 30]))
            module.decode(q, k, v, torch.tensor([4, 7], dtype=torch.int32), table, 0.25)
            module.prefill(q, k, v, cu_seqlens([1, 1]), cu_seqlens([4, 7]), 1, 24, 0.25, True,
                           table)
        assert mode.copies == [], f"the cache was copied by {mode.copies}"
        assert len(mode.seen) > 10, "the mode saw the backend's aten ops"
