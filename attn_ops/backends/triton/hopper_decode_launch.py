"""Host side of the Gluon Hopper decode (hopper_decode_kernel.py): how TMA reads the caches, and
its launch.

The Triton backend's decode takes it for plain half-precision decodes whose (sequence, KV head)
pairs fill 0.75-2 programs per SM (decode_kernel.hopper_route, decode_plan.HOPPER_DECODE). The
kernel deals the key tiles of the whole batch evenly over its programs (:func:`programs`;
decode_balanced_kernel.py's schedule) and merges the pieces of a split pair by their
log-sum-exps, so a skewed batch costs what its total keys cost: B 16 of 4 x 8192 and 12 x 512
keys 49.8 us against the Triton kernels' 56.7; at uniform lengths over SDPA's contiguous cache
it runs 0.99-1.00x SDPA at B 13-33 (BENCHMARKS.md, twenty-fifth and twenty-sixth passes;
``python benchmarks/bench_decode.py --hopper-only``).

Public surface: :func:`available`, :func:`cache_view`, :func:`cache_reason`,
:func:`shape_reason`, :func:`programs`, :func:`decode`, :func:`bind_decode`.
"""

from __future__ import annotations

from attn_ops.backends.triton.common import next_pow2
from attn_ops.backends.triton.hopper_decode_kernel import GLUON
from attn_ops.backends.triton.hopper_tma import shared_layout
from attn_ops.backends.triton.split_counters import COUNT_LIMIT

if GLUON:
    from attn_ops.backends.triton.hopper_decode_kernel import hopper_decode_kernel

LOG2E = 1.4426950408889634
# 64-key tiles, two stages (K + V 32 KB each at D 128: 80 KB with Q's tile) and at most 128
# registers per thread (the consumer warpgroup gets 224, the producer warp 32), so two programs
# share an SM. H200, bf16, 32/8 heads, graph replays over SDPA's contiguous cache, us, against 3
# stages at one program per SM, 4 stages, 128-key tiles at 2 stages (SDPA): B 16 x 2048 36.96 vs
# 37.18 / 37.92 / 37.25 (36.80); x 8192 126.27 vs 126.53 / 128.13 / 126.08 (125.82); B 24 x
# 2048 54.18 vs 62.85 / 63.36 / 58.88 (54.53): at 192 programs only two per SM keep one wave.
BLOCK_N, STAGES, MAXNREG, PRODUCER_REGS = 64, 2, 128, 32
RESIDENT = 2  # programs per SM at MAXNREG and the ring above
# Every program reads every sequence's length (a [next_pow2(B)] vector: 4 values a thread in the
# producer warp at 128, whose 32 registers hold no more).
MAX_BATCH = 128


def available(device=None) -> bool:
    """Gluon's Hopper API importable, and ``device`` is an sm90 GPU."""
    from attn_ops.backends.triton import hopper_prefill_launch
    return GLUON and hopper_prefill_launch.available(device)


def cache_view(x) -> tuple | None:
    """How TMA reads a cache ``[blocks, page, Hkv, D]`` (strides ``(s0, s1, s2, 1)``) as a row
    matrix: ``(shape, strides, rows_per_block, rows_per_head, cols_per_head)``
    (hopper_decode_kernel), or None for a layout it cannot read. Token-major pages (``s2 ==
    D``, ``s1`` a row of the Hkv heads: the usual paged cache): rows of ``s1`` elements, the
    heads side by side in a row. Heads-major (``s1 == D``: SDPA's ``[B, Hkv, S, D]``
    transposed, one block per sequence): rows of D, a head's keys consecutive. Rows and base
    16-byte aligned, fewer than 2^31 rows, a page a multiple of 16 keys."""
    blocks, page, heads, d = x.shape
    s0, s1, s2, s3 = x.stride()
    if s3 != 1 or blocks == 0 or page % 16 or x.data_ptr() % 16:
        return None
    if s2 == d and s1 >= heads * d and s0 % s1 == 0:
        rows = (blocks - 1) * (s0 // s1) + page
        view = ([rows, heads * d], [s1, 1], s0 // s1, 0, d)
    elif s1 == d and s2 % d == 0 and s0 % d == 0:
        rows = ((blocks - 1) * s0 + (heads - 1) * s2) // d + page
        view = ([rows, d], [d, 1], s0 // d, s2 // d, 0)
    else:
        return None
    if (view[1][0] * x.element_size()) % 16 or rows >= 2 ** 31:
        return None
    return view


def shape_reason(q, k_cache, block_table) -> str | None:
    """None when the kernel serves these shapes, else why not: at most MAX_BATCH sequences, a
    GQA group of at most 64 query heads (one wgmma tile's rows), D 64 or 128, q in fp16 /
    bf16 and the caches in q's dtype, a key range below 2^31 tiles (int32 arithmetic), fewer
    tiles a sequence than the merge's counter holds (split_counters.COUNT_LIMIT)."""
    import torch
    batch, heads, d = q.shape
    kv_heads = k_cache.shape[2]
    if batch > MAX_BATCH:
        return f"hopper decode: batch {batch} (serves at most {MAX_BATCH} sequences)"
    if heads % kv_heads or heads // kv_heads > 64 or d not in (64, 128):
        return (f"hopper decode: {heads} query heads over {kv_heads} KV heads of dim {d} "
                "(serves groups of at most 64 heads, D 64 or 128)")
    if q.dtype not in (torch.float16, torch.bfloat16) or k_cache.dtype != q.dtype:
        return f"hopper decode: q {q.dtype}, cache {k_cache.dtype} (serves fp16 / bf16 alike)"
    tiles = -(-block_table.shape[1] * k_cache.shape[1] // BLOCK_N)
    if batch * kv_heads * tiles >= 2 ** 31 or tiles >= COUNT_LIMIT:
        return (f"hopper decode: {tiles} key tiles a sequence (serves fewer than "
                f"{COUNT_LIMIT}, and fewer than 2^31 in the batch)")
    return None


def cache_reason(k_cache, v_cache, block_table) -> str | None:
    """None when the kernel reads these caches right, else why not: :func:`cache_view` reads
    both alike, and no 64-key tile crosses a page (a page shorter than 64 keys divides 64, a
    longer one is a multiple of 64), unless the table has one column (a tile past a page's end
    holds only keys past the sequence, which the kernel masks)."""
    view = cache_view(k_cache)
    if view is None or view[2:] != (cache_view(v_cache) or ())[2:]:
        return (f"hopper decode: caches of strides {tuple(k_cache.stride())} / "
                f"{tuple(v_cache.stride())} (serves token-major pages or a heads-major cache, "
                "16-byte aligned rows, pages of 16 keys or more, K and V alike)")
    page = k_cache.shape[1]
    if block_table.shape[1] > 1 and BLOCK_N % page and page % BLOCK_N:
        return (f"hopper decode: page size {page} with {block_table.shape[1]} blocks per "
                f"sequence (serves pages that divide {BLOCK_N} or that {BLOCK_N} divides)")
    return None


def programs(batch: int, num_kv_heads: int, sms: int, capacity: int = 0) -> int:
    """The grid for a table of ``capacity`` keys per sequence: one program per (sequence, KV
    head) while the pairs fit one program per SM, or two per SM at short tables; past that two
    per SM, each taking its share of the batch's tiles (a pair split between programs is merged).

    H200, bf16, 32/8 heads, uniform lengths over SDPA's contiguous cache, graph replays, us at
    P = pairs / 132 / 264 (twenty-fifth pass): B 16 x 2048 (128 pairs) 37.7 / 40.6 / 42.6, a
    pair split in two costs its merge and its second partial; B 24 x 2048 (192) 54.7 / 57.1 /
    56.9; but B 24 x 8192 197.2 / 190.2 / 189.7 and B 28 x 4096 (224) 118.3 / 116.6 / 115.4,
    where some SMs hold one program and some two for a long walk."""
    pairs = batch * num_kv_heads
    if pairs <= sms or (pairs <= RESIDENT * sms and capacity <= SHORT_TABLE):
        return max(1, pairs)
    return RESIDENT * sms


SHORT_TABLE = 2048  # keys: programs() keeps one program per pair up to two per SM


def _plan(q, k_cache, v_cache, seqlens_k, block_table, scale: float, out_strides,
          progs: int) -> tuple:
    """(the (shape, strides, block, layout) of K's and V's descriptors, the scalars after the
    nine pointers, constexprs and options) of one launch of ``progs`` programs."""
    import torch
    batch, num_heads, head_dim = q.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    rows = min(page, BLOCK_N)
    layout = shared_layout(rows, head_dim, q.dtype == torch.float16)
    views = [cache_view(x) for x in (k_cache, v_cache)]
    descs = [(v[0], v[1], [rows, head_dim], layout) for v in views]
    scalars = (q.stride(0), q.stride(1), out_strides[0], out_strides[1], seqlens_k.stride(0),
               block_table.stride(0), block_table.stride(1), block_table.shape[1], *views[0][2:],
               batch, num_kv_heads, float(scale) * LOG2E)
    consts = dict(GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_N=BLOCK_N,
                  STAGES=STAGES, PAGE=page, PAGE_ROWS=rows, B_P2=max(32, next_pow2(batch)),
                  PRODUCER_REGS=PRODUCER_REGS, num_warps=4, maxnreg=MAXNREG)
    return descs, scalars, consts


def decode(q, k_cache, v_cache, seqlens_k, block_table, scale: float, out=None,
           progs: int | None = None):
    """q ``[B, H, D]`` (fp16 / bf16; at most MAX_BATCH sequences, H / Hkv at most 64), caches
    ``[blocks, page, Hkv, D]`` of q's dtype that :func:`cache_reason` accepts (else
    ValueError), ``seqlens_k`` int32 ``[B]``, ``block_table`` int32 ``[B, W]``. Returns ``[B,
    H, D]`` in q's dtype (or fills ``out``, ``[B, H, D]`` with a contiguous last dim). No host
    sync. ``progs`` overrides the program count (:func:`programs`; any count from 1: the
    kernel deals tiles, not pairs)."""
    reason = cache_reason(k_cache, v_cache, block_table) or shape_reason(q, k_cache,
                                                                          block_table)
    if reason is not None:
        raise ValueError(reason)
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from attn_ops.backends.triton.common import device_sm_count
    from attn_ops.backends.triton.split_counters import partials, semaphores
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    batch, num_heads, head_dim = q.shape
    if batch == 0:
        return out
    num_kv_heads = k_cache.shape[2]
    progs = progs or programs(batch, num_kv_heads, device_sm_count(q.device),
                              block_table.shape[1] * k_cache.shape[1])
    descs, scalars, consts = _plan(q, k_cache, v_cache, seqlens_k, block_table, scale,
                                   out.stride(), progs)
    k_desc, v_desc = (TensorDescriptor(x, *d) for x, d in zip((k_cache, v_cache), descs))
    slot_rows = progs * 2 * (num_heads // num_kv_heads)
    o_part, lse_part = partials((slot_rows, head_dim), (slot_rows,), q.device)
    sema = semaphores(batch * num_kv_heads, q.device)
    hopper_decode_kernel[(progs,)](k_desc, v_desc, q, out, o_part, lse_part, sema, seqlens_k,
                                   block_table, *scalars, **consts)
    return out


def bind_decode(q, k_cache, v_cache, seqlens_k, block_table, scale: float, fallback=None):
    """:func:`decode` for the call signature of these arguments (shapes, strides, dtypes,
    devices, scale), which :func:`cache_reason` and :func:`shape_reason` accept: the grid, the
    layouts and every non-pointer argument computed once, the launch prepared (launch.prepare:
    the compiled launcher called directly, each cache's descriptor encoded once per base
    address). A call allocates the output, takes the current stream's kept partials and
    counters (split_counters), wraps the caches in descriptors whose fields are set directly
    and launches. A call the signature cannot serve directly (traced, a tensor subclass, a
    cache base not 16-byte aligned) takes ``fallback`` (default :func:`decode`, which raises
    for such a cache) with every argument given. Arguments after ``scale`` (the Triton
    backend's: window, softcap, ...) are passed to ``fallback`` only: this signature's are the
    defaults."""
    import torch

    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from attn_ops.backends.triton.common import device_sm_count
    from attn_ops.backends.triton.hopper_tma import descriptor_maker
    from attn_ops.backends.triton.launch import prepare, stats
    from attn_ops.backends.triton.split_counters import partials, semaphores
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    progs = programs(batch, num_kv_heads, device_sm_count(q.device),
                     block_table.shape[1] * k_cache.shape[1])
    out_strides = torch.empty(q.shape, device="meta").stride()  # a fresh contiguous output's
    descs, scalars, consts = _plan(q, k_cache, v_cache, seqlens_k, block_table, scale,
                                   out_strides, progs)
    desc_k, desc_v = (descriptor_maker(TensorDescriptor, *d) for d in descs)
    # Alignment checked per call: q, the lengths and the table (positions 2, 7, 8); the caches'
    # bases below; out, the partials and the counters are this wrapper's allocations.
    launch = prepare(hopper_decode_kernel, (progs,), consts, (2, 7, 8), scalars)
    slot_rows = progs * 2 * (num_heads // num_kv_heads)
    part_shapes = ((slot_rows, head_dim), (slot_rows,))  # the partials' (outputs, LSEs)
    shape, dtype, device = q.shape, q.dtype, q.device
    empty, empty_like, pairs = torch.empty, torch.empty_like, batch * num_kv_heads
    like_q = q.stride() == out_strides
    tensor, depth = torch.Tensor, torch._C._len_torch_dispatch_stack

    fallback = fallback or decode

    def run(q, k_cache, v_cache, seqlens_k, block_table, scale, *rest):
        if type(q) is not tensor or depth() or (k_cache.data_ptr() | v_cache.data_ptr()) & 15:
            return fallback(q, k_cache, v_cache, seqlens_k, block_table, scale, *rest)
        stats["bound"] += 1
        out = empty_like(q) if like_q else empty(shape, dtype=dtype, device=device)
        launch((desc_k(k_cache), desc_v(v_cache), q, out,
                *partials(*part_shapes, device),
                semaphores(pairs, device), seqlens_k, block_table))
        return out
    return run
