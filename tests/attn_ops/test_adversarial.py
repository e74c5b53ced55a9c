"""Adversarial input, across backends: isolation of non-finite data, bad scalars, empty caches.

The contract (docs/DESIGN.md): nothing a query row does not see (another sequence's tokens, an
unowned cache slot, a key masked out by causality or the window, padding) may reach its output.
Each test plants NaN / Inf / random bit patterns where some rows must not see them and compares
the rows that do not see them with the float64 oracle of tests/support/helpers.py, which skips
masked keys and so is isolated by construction. Rows that do see a non-finite value must say so
(at least one non-finite element per row and head): NaN never passes silently.
"""

import math

import pytest
import torch

import attn_ops
from tests.support.helpers import (TOLERANCES, assert_close, attention_f64, cu_seqlens,
                                   prefill_f64, random_paged)

BACKENDS = ["reference", "sdpa", "triton"]
H, HKV, D = 4, 2, 32


def _garbage(shape, dtype) -> torch.Tensor:
    """What a never-written ``torch.empty`` cache may hold: random bits, plus NaN and +-Inf."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype]
    info = torch.iinfo(bits)
    out = torch.randint(info.min, info.max, shape, dtype=bits).view(dtype)
    flat = out.view(-1)
    flat[::7], flat[3::11], flat[5::13] = math.nan, math.inf, -math.inf
    return out


def _check_isolated(out: torch.Tensor, expected: torch.Tensor, dtype, clean_rows) -> None:
    """Rows (and heads) where the oracle is finite match it; the others are flagged non-finite.

    ``clean_rows``: indices of rows the planted values must not reach (the test's own sanity
    check: the oracle must be finite there, else the test proves nothing).
    """
    finite = torch.isfinite(expected).all(-1)  # [T, H]
    assert finite[clean_rows].all(), "test setup: rows meant to be clean see a planted value"
    assert_close(out[finite], expected[finite].to(out.dtype), *TOLERANCES[dtype],
                 what="rows that do not see the planted values")
    flagged = (~torch.isfinite(out[~finite])).any(-1)
    assert flagged.all(), f"{int((~flagged).sum())} rows that see a NaN/Inf came out finite"


def _served(cases: list[tuple]) -> list[tuple]:
    """``(backend, *case)`` for every backend and case it serves (``case[-1]``: the softcap;
    sdpa refuses softcap, and tests/attn_ops/backends/test_sdpa.py checks the reason)."""
    return [(b, *c) for b in BACKENDS for c in cases if not (b == "sdpa" and c[-1] > 0)]


# ---------------------------------------------------------------------------------------------
# Item 2: one sequence's NaN / Inf stays in the rows that see it
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,causal,window,softcap", _served([
    (True, -1, 0.0), (True, 1, 0.0), (False, -1, 0.0), (False, 2, 0.0), (True, -1, 8.0)]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("plant", ["v_nan", "v_inf", "k_nan"])
@pytest.mark.parametrize("lens_q,lens_k", [([5, 3, 13], [5, 3, 13]), ([2, 3, 4], [5, 3, 13])])
def test_prefill_planted_value_stays_in_its_rows(backend, dtype, causal, window, softcap,
                                                 plant, lens_q, lens_k):
    q = torch.randn(sum(lens_q), H, D, dtype=dtype)
    k = torch.randn(sum(lens_k), HKV, D, dtype=dtype)
    v = torch.randn(sum(lens_k), HKV, D, dtype=dtype)
    # Row 0 (sequence 0) is what padded tile positions of every other sequence used to read;
    # key 6 of sequence 2 is in the causal future of its first queries, or outside the window.
    target = v if plant.startswith("v") else k
    for row in (0, lens_k[0] + lens_k[1] + 6):
        target[row] = math.inf if plant == "v_inf" else math.nan
    args = (q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k), D ** -0.5,
            causal, None, window, softcap)
    out = attn_ops.prefill(*args, backend=backend)
    expected = prefill_f64(q, k, v, lens_q, lens_k, D ** -0.5, causal, window, softcap)
    _check_isolated(out, expected, dtype, clean_rows=slice(lens_q[0], lens_q[0] + lens_q[1]))


# ---------------------------------------------------------------------------------------------
# Item 3: garbage in cache slots no sequence owns never reaches decode / paged prefill
# ---------------------------------------------------------------------------------------------

def _garbage_cache(lens_k, dtype, block_size=4, width=6):
    """A paged batch whose every unowned slot (spare blocks, block tails) holds garbage, and
    whose block-table entries past each sequence's last block point at garbage blocks."""
    pb = random_paged(lens_k, HKV, D, block_size, dtype, spare_blocks=2, table_width=width)
    num_blocks = pb.k_cache.shape[0]
    owned = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    used_blocks = set()
    for b, n in enumerate(lens_k):
        for p in range(n):
            blk = int(pb.block_table[b, p // block_size])
            owned[blk * block_size + p % block_size] = True
            used_blocks.add(blk)
    spare = [i for i in range(num_blocks) if i not in used_blocks]
    for b, n in enumerate(lens_k):
        first_unused = -(-n // block_size)
        pb.block_table[b, first_unused:] = spare[b % len(spare)]
    for cache in (pb.k_cache, pb.v_cache):
        flat = cache.view(-1, HKV, D)
        flat[~owned] = _garbage((int((~owned).sum()), HKV, D), dtype)
    return pb


@pytest.mark.parametrize("backend,window,softcap", _served([(-1, 0.0), (3, 0.0), (-1, 5.0)]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_reads_only_owned_slots(backend, dtype, window, softcap):
    lens = [1, 13, 0, 6]
    pb = _garbage_cache(lens, dtype)
    if window >= 0:  # sequence 1's first key is outside the window of its query: poison it
        slot0 = int(pb.block_table[1, 0]) * 4
        pb.v_cache.view(-1, HKV, D)[slot0] = math.nan
    q = torch.randn(len(lens), H, D, dtype=dtype)
    out = attn_ops.decode(q, pb.k_cache, pb.v_cache, torch.tensor(lens, dtype=torch.int32),
                          pb.block_table, D ** -0.5, window, softcap, backend=backend)
    for b, n in enumerate(lens):
        if window >= 0 and b == 1:
            pb.v_dense[1][0] = math.nan  # the oracle skips it (outside the window)
        expected = attention_f64(q[b:b + 1], pb.k_dense[b], pb.v_dense[b], D ** -0.5, True,
                                 window, softcap)[0]
        assert_close(out[b], expected, *TOLERANCES[dtype], what=f"sequence {b}")
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal,window", [(True, -1), (False, -1), (True, 2)])
def test_paged_prefill_reads_only_owned_slots(backend, dtype, causal, window):
    lens_q, lens_k = [3, 1, 7], [10, 5, 7]
    pb = _garbage_cache(lens_k, dtype)
    q = torch.randn(sum(lens_q), H, D, dtype=dtype)
    out = attn_ops.prefill(q, pb.k_cache, pb.v_cache, cu_seqlens(lens_q), cu_seqlens(lens_k),
                           max(lens_q), max(lens_k), D ** -0.5, causal, pb.block_table, window,
                           backend=backend)
    expected = prefill_f64(q, torch.cat(pb.k_dense), torch.cat(pb.v_dense), lens_q, lens_k,
                           D ** -0.5, causal, window)
    assert_close(out, expected, *TOLERANCES[dtype])


# ---------------------------------------------------------------------------------------------
# Item 6: non-finite scalars are refused, naming the argument, eagerly and at trace time
# ---------------------------------------------------------------------------------------------

BAD_SCALARS = [(dict(scale=math.inf), "scale"), (dict(scale=-math.inf), "scale"),
               (dict(scale=math.nan), "scale"), (dict(softcap=math.inf), "softcap"),
               (dict(softcap=math.nan), "softcap"), (dict(softcap=-1.0), "softcap")]


def _prefill_call(scale=0.2, softcap=0.0):
    q = torch.randn(6, H, D)
    k = torch.randn(6, HKV, D)
    cu = cu_seqlens([2, 4])
    return (q, k, k.clone(), cu, cu, 4, 4, scale, True, None, -1, softcap)


def _decode_call(scale=0.2, softcap=0.0):
    pb = random_paged([3, 5], HKV, D, 4, torch.float32)
    return (torch.randn(2, H, D), pb.k_cache, pb.v_cache, torch.tensor([3, 5], dtype=torch.int32),
            pb.block_table, scale, -1, softcap)


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("op", ["prefill", "decode"])
@pytest.mark.parametrize("bad,name", BAD_SCALARS)
def test_non_finite_scalars_are_refused(op, bad, name, traced):
    fn = getattr(torch.ops.attn, op).default
    args = (_prefill_call if op == "prefill" else _decode_call)(**bad)
    if traced:
        torch._dynamo.reset()
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    # Eagerly a ValueError; at trace time Dynamo wraps the fake kernel's ValueError.
    with pytest.raises(Exception if traced else ValueError, match=rf"{name}: expected"):
        fn(*args)


# ---------------------------------------------------------------------------------------------
# Item 7: an empty cache (num_blocks = 0) with all-padding calls
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_cache_all_padding(backend):
    k_cache, v_cache = torch.empty(0, 4, HKV, D), torch.empty(0, 4, HKV, D)
    attn_ops.store_kvcache(torch.randn(3, HKV, D), torch.randn(3, HKV, D), k_cache, v_cache,
                           torch.full((3,), -1, dtype=torch.int64), backend=backend)
    table = torch.full((2, 3), -7, dtype=torch.int32)
    out = attn_ops.decode(torch.randn(2, H, D), k_cache, v_cache,
                          torch.zeros(2, dtype=torch.int32), table, 0.2, backend=backend)
    assert torch.equal(out, torch.zeros(2, H, D))
    zeros = cu_seqlens([0, 0])
    out = attn_ops.prefill(torch.randn(3, H, D), k_cache, v_cache, zeros, zeros, 0, 0, 0.2, True,
                           table, backend=backend)  # 3 tail rows owned by no sequence
    assert torch.equal(out, torch.zeros(3, H, D))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_see_no_key_read_nothing(backend):
    # A sequence with no key reads some row for its padded tile (nothing of its own exists):
    # here every such row is NaN, and its output must still be exactly zero.
    k_cache = torch.full((3, 4, HKV, D), math.nan)
    v_cache = torch.full((3, 4, HKV, D), math.nan)
    k_cache[2, :3], v_cache[2, :3] = torch.randn(3, HKV, D), torch.randn(3, HKV, D)
    table = torch.tensor([[2, -7], [-7, 10 ** 6]], dtype=torch.int32)
    q = torch.randn(2, H, D)
    out = attn_ops.decode(q, k_cache, v_cache, torch.tensor([3, 0], dtype=torch.int32), table,
                          0.2, backend=backend)
    assert_close(out[0], attention_f64(q[:1], k_cache[2, :3], v_cache[2, :3], 0.2, True)[0],
                 *TOLERANCES[torch.float32])
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    # Non-causal prefill: sequence 1 has 3 queries and no key (a split key set).
    q, k, v = torch.randn(5, H, D), torch.randn(4, HKV, D), torch.randn(4, HKV, D)
    k[3] = v[3] = math.nan  # the row sequence 1's padding reads, and sequence 0's last key
    out = attn_ops.prefill(q, k, v, cu_seqlens([2, 3]), cu_seqlens([4, 0]), 3, 4, 0.2, False,
                           backend=backend)
    assert torch.isnan(out[:2]).all(-1).all()
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))
