"""Host side of the Gluon Hopper prefill (hopper_prefill_kernel.py): what it serves, where it
runs, and the launch (TMA descriptors over the packed rows or the cache's pages, the grid from
static bounds).

Public surface: :func:`available`, :func:`supports`, :func:`prefill`, :func:`prefill_guarded`
(the contract's entry point: this kernel, then the FA2-style kernel's fixup launch,
hopper_prefill_fixup.fixup, also importable from here) and :func:`bind_prefill_guarded` (the
same for one call signature, planned once).
"""

from __future__ import annotations

import functools
import math

from attn_ops.backends.triton.hopper_prefill_fixup import (extra_pointers, fixup,
                                                            fixup_launch_args)
from attn_ops.backends.triton.hopper_prefill_forms import (SOLO_MAXNREG, consumers,
                                                            packed_config, packing, solo_config)
from attn_ops.backends.triton.hopper_prefill_kernel import GLUON
from attn_ops.backends.triton.hopper_tma import (descriptor_maker, heads_packed, row_matrix,
                                                 shared_layout, tma_rows)

if GLUON:
    from attn_ops.backends.triton.hopper_prefill_kernel import hopper_prefill_kernel

LOG2E = 1.4426950408889634
BLOCK_M = 64  # rows per consumer warpgroup (wgmma's M); a program owns CONSUMERS * BLOCK_M rows
# The shared memory a block may opt into on sm90 (227 KB).
SHARED_MEMORY = 227 * 1024
# BLOCK_N, STAGES per head dim. Shared memory at D=128: Q 32 KB + (K + V) 64 KB per stage.
_CONFIGS = {64: (128, 3), 128: (128, 2)}
# Paged prefixes with chunks of at most 1024 queries (chunked prefill) at D 128: a third K/V
# stage (224 KB of shared memory). H200 graph replays, kernel alone, pages of 16, 3 vs 2 stages:
# 2 x 512 over 4096 +3.3%, 4 x 1024 over 3072 +4.7%, 4 x 256 over 4096 +5.6%, 8 x 512 over 1536
# +5.0%, 1 x 512 over 8192 +2.2%; longer chunks mixed (8 x 2048 over 2048 +3.3%, 2 x 2048 over
# 6144 -0.4%, 1 x 4096 over 12288 -2.0%); dense prompts within 0.5%.
_PAGED_CHUNK_STAGES, _PAGED_CHUNK_MAX_Q = 3, 1024
# Registers per thread: 4 + 4 + 1 warps round to 12 (3 warpgroups), capped at 168 (168 * 384 <=
# 64 K). Triton 3.6 gives the default partition 256, so the workers share 248 (256 + 248 = 3 *
# 168: more and the consumer's setmaxnreg.inc would wait for registers that never free). The
# producer warp needs 24 over dense K/V, which leaves the consumer worker 224: at 216 it
# spilled 20 bytes per item once a warpgroup could pass an item without rows (H200 graph
# replays, 96 x U(1, 400): 260.4 us at 216/32 against 253.2 at 224/24; other shapes within 1%).
# Over a paged cache the producer also walks the block table; there the D 128 build spills those
# 20 bytes at either split (values of the kernel's entry reloaded per item, outside the K/V
# loop), and keeps the split its figures were measured at. ptxas for sm_90a, off the GPU.
MAXNREG = 168
CONSUMER_REGS, PRODUCER_REGS = 224, 24  # dense K/V
PAGED_CONSUMER_REGS, PAGED_PRODUCER_REGS = 216, 32


def available(device=None) -> bool:
    """Gluon's Hopper API importable, and ``device`` (default: the current CUDA device) is an
    sm90 GPU."""
    if not GLUON:
        return False
    import torch
    if not torch.cuda.is_available():
        return False
    from attn_ops.backends.triton.common import device_is_sm90  # capability read once
    dev = torch.device("cuda") if device is None else torch.device(device)
    return device_is_sm90(dev)


def supports(q_dtype, head_dim: int, causal: bool = True, page_size: int = 0,
             window_left: int = -1, softcap: float = 0.0, sinks: bool = False,
             fp8: bool = False, return_lse: bool = False) -> str | None:
    """None when this kernel can serve the call, else the reason (static facts only).
    ``page_size``: the paged cache's (0: dense K/V); see :func:`cache_reason` for its layout.
    Sinks and the lse output are served (the rows' finish); a window, softcap and FP8 caches
    are not."""
    import torch
    if q_dtype not in (torch.float16, torch.bfloat16):
        return f"hopper prefill: q dtype {q_dtype} (serves float16 / bfloat16)"
    if head_dim not in _CONFIGS:
        return f"hopper prefill: head_dim {head_dim} (serves {sorted(_CONFIGS)})"
    block_n = _CONFIGS[head_dim][0]
    if page_size and (page_size % 16 or (block_n % page_size and page_size % block_n)):
        # A tile's keys are TMA copies of whole page pieces into row slices of its slot: 16-row
        # pieces keep the slices on the shared layout's 8-row swizzle atoms.
        return (f"hopper prefill: page size {page_size} (serves multiples of 16 that divide "
                f"{block_n} or that {block_n} divides)")
    for flag, what in ((window_left >= 0, "a sliding window"), (softcap > 0, "softcap"),
                       (fp8, "fp8 caches")):
        if flag:
            return f"hopper prefill: {what} is not supported"
    return None


def cache_reason(k, v) -> str | None:
    """None when the paged caches ``[blocks, page, Hkv, D]`` are rows TMA can read (each page's
    tokens ``[page, Hkv * D]`` packed, pages one after another, 16-byte rows, fewer than 2^31
    rows), else the reason. Strides only: a call signature fixes the answer."""
    for name, x in (("k_cache", k), ("v_cache", v)):
        blocks, page, heads, d = x.shape
        if (x.stride(3) != 1 or x.stride(2) != d or x.stride(1) != heads * d
                or (blocks > 1 and x.stride(0) != page * x.stride(1))):
            return (f"hopper prefill: {name} strides {tuple(x.stride())} (serves pages of packed "
                    f"[page, Hkv * D] rows, one after another)")
        if (x.stride(1) * x.element_size()) % 16 or blocks * page >= 2 ** 31:
            return f"hopper prefill: {name} rows are not 16-byte aligned, or 2^31 or more"
    return None


def prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
            scale: float, causal: bool = True, block_table=None, out=None, flags=None,
            min_q: int = 0, n_consumers: int | None = None, pack: int | None = None,
            sinks=None, lse=None):
    """q ``[Tq, H, D]``, k/v ``[Tk, Hkv, D]`` or paged caches ``[blocks, page, Hkv, D]`` with
    ``block_table`` int32 ``[B, W]`` (float16 / bfloat16, D in 64 / 128, ``H % Hkv == 0``; pages
    as :func:`supports` and :func:`cache_reason` say), cu_seqlens ``[B + 1]`` int32 on q's
    device. Returns ``[Tq, H, D]`` in q's dtype (or fills ``out``, contiguous ``[Tq, H, D]``).
    Causal masks are bottom-right aligned; a row that sees no key, and every row past
    ``cu_seqlens_q[-1]``, is zero. No host sync: the items come from ``max_seqlen_q`` and B, the
    persistent grid is one program per SM (at most; two with one consumer). ``n_consumers``:
    consumer warpgroups per program, 1 or 2, and ``pack``, query heads per item (both None:
    :func:`form`'s rules). ``flags``: int32
    :func:`flags_shape` (its contents need not be initialised), all written: 1 where an output
    row of the flag's is not finite, else 0 (allocated here when None).
    ``min_q``: sequences of at most that many queries are left alone, their rows unwritten
    (another kernel's: the split route). ``sinks``: float32 ``[H]``, each head's logit in its
    rows' softmax denominator; ``lse``: float32 ``[Tq, H]`` (contiguous) receives each row's
    natural-log denominator (``-inf`` where a row sees no key).

    Not isolating (see the kernel's docstring): :func:`prefill_guarded` is the contract's
    entry point."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if _nothing_to_launch(q, k, cu_seqlens_q, block_table):
        if lse is not None:
            lse.fill_(float("-inf"))
        return out if q.shape[0] == 0 else out.zero_()  # no key anywhere (static shapes)
    n_consumers, pack = form(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal,
                             block_table, min_q, n_consumers, pack)
    grid, scalars, consts, shape, blocks = _plan(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                 scale, causal, out.stride(), block_table, min_q,
                                                 n_consumers, max_seqlen_k, pack, sinks,
                                                 lse is not None)
    if flags is None:
        flags = torch.empty(shape, dtype=torch.int32, device=q.device)
    descs = [TensorDescriptor(*tma_rows(x), [rows, q.shape[2]], layout)
             for x, (rows, layout) in zip((q, k, v), (blocks[0], blocks[1], blocks[1]))]
    table = block_table if block_table is not None else cu_seqlens_k  # dense: unused
    hopper_prefill_kernel[grid](*descs, out, cu_seqlens_q, cu_seqlens_k, flags, table,
                                *extra_pointers(q, sinks, lse), *scalars, **consts)
    return out


def form(q, k, cu_seqlens_q, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
         block_table=None, min_q: int = 0, n_consumers: int | None = None,
         pack: int | None = None) -> tuple[int, int]:
    """(consumers, pack) of a launch: as given (a given ``n_consumers`` alone means no
    packing), else the rules of hopper_prefill_forms: the packed form where :func:`packing`
    takes the call (never beside ``min_q``), else :func:`consumers`."""
    if pack is None:
        pack = 1
        if n_consumers is None and not min_q:
            from attn_ops.backends.triton.common import device_sm_count
            num_kv_heads = k.shape[2] if block_table is not None else k.shape[1]
            pack = packing(q.shape[1], num_kv_heads, max_seqlen_q, cu_seqlens_q.shape[0] - 1,
                           device_sm_count(q.device))
    if pack > 1:
        return 1, pack
    if n_consumers is None:
        n_consumers = consumers(q.shape[2], causal, max_seqlen_k, block_table is not None)
    return n_consumers, 1


def _nothing_to_launch(q, k, cu_seqlens_q, block_table) -> bool:
    """Static shapes hold no query row, no sequence or no key."""
    return (q.shape[0] == 0 or k.shape[0] == 0 or cu_seqlens_q.shape[0] == 1
            or (block_table is not None and block_table.numel() == 0))


def flags_shape(max_seqlen_q: int, num_seqs: int, num_heads: int,
                n_consumers: int = 2) -> tuple[int, int, int, int]:
    """The kernel's items (tiles of ``n_consumers * BLOCK_M`` rows, B + 1, H) and their flags,
    an int32 each: one per consumer warpgroup (64 rows) with two consumers, one per warp (16
    rows) with one (the kernel's docstring)."""
    tile = n_consumers * BLOCK_M
    return (max(1, -(-int(max_seqlen_q) // tile)), num_seqs + 1, num_heads, 2 * (3 - n_consumers))


def _plan(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, scale: float, causal: bool,
          out_strides, block_table=None, min_q: int = 0, n_consumers: int = 2,
          max_seqlen_k: int | None = None, pack: int = 1, sinks=None,
          with_lse: bool = False) -> tuple:
    """(grid, the scalars after the 10 pointers, constexprs and options, the flags' shape,
    ((Q rows, layout), (K/V rows, layout)) of the descriptors' blocks) of one launch with
    ``n_consumers`` consumer warpgroups per program, from static facts only
    (``max_seqlen_k``, default ``max_seqlen_q``, picks the one-consumer form's key step).
    ``pack`` > 1: the packed form (one consumer, ``min_q`` 0; hopper_prefill_forms.packing)."""
    import torch

    from attn_ops.backends.triton.common import device_sm_count
    total_q, num_heads, head_dim = q.shape
    num_seqs = cu_seqlens_q.shape[0] - 1
    sms = device_sm_count(q.device)
    solo = n_consumers == 1
    per_sm = 3 - n_consumers  # programs per SM: one, or two with one consumer
    if pack > 1:
        if not solo or min_q:
            raise ValueError("hopper prefill: the packed form is one consumer's, without min_q")
        block_n, stages, per_sm = packed_config(num_seqs * num_heads // pack, sms)
    elif solo:
        keys = max_seqlen_q if max_seqlen_k is None else max_seqlen_k
        block_n, stages = solo_config(head_dim, keys)
    else:
        block_n, stages = _CONFIGS[head_dim]
    if (not solo and block_table is not None and head_dim == 128
            and max_seqlen_q <= _PAGED_CHUNK_MAX_Q):
        stages = _PAGED_CHUNK_STAGES
    shape = flags_shape(max_seqlen_q, num_seqs, num_heads, n_consumers)
    grid = (min(shape[0] * shape[1] * shape[2], per_sm * sms),)  # items, programs
    if block_table is None:
        page, kv_rows, num_kv_heads, table_strides = 0, block_n, k.shape[1], (0, 0, 1)
    else:
        page, num_kv_heads = k.shape[1], k.shape[2]
        kv_rows = min(page, block_n)
        table_strides = (*block_table.stride(), block_table.shape[1])
    scalars = (out_strides[0], out_strides[1], cu_seqlens_q.stride(0), cu_seqlens_k.stride(0),
               *table_strides, total_q, num_seqs, num_heads, shape[0], int(min_q),
               float(scale) * LOG2E, 0 if sinks is None else sinks.stride(0))
    consts = dict(GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=BLOCK_M,
                  BLOCK_N=block_n, STAGES=stages, CAUSAL=bool(causal), PAGE=page,
                  PAGE_ROWS=kv_rows, COMPACT=min_q > 0,
                  STAGE_OUT=_stage_out(head_dim, block_n, stages, n_consumers),
                  CONSUMER_REGS=PAGED_CONSUMER_REGS if page else CONSUMER_REGS,
                  PRODUCER_REGS=PAGED_PRODUCER_REGS if page else PRODUCER_REGS,
                  CONSUMERS=n_consumers, PACK=pack, SINKS=sinks is not None,
                  WITH_LSE=bool(with_lse), num_warps=4,
                  maxnreg=SOLO_MAXNREG if solo else MAXNREG)
    fp16 = q.dtype == torch.float16
    blocks = ((BLOCK_M // pack, shared_layout(BLOCK_M // pack, head_dim, fp16)),
              (kv_rows, shared_layout(kv_rows, head_dim, fp16)))
    return grid, scalars, consts, shape, blocks


def _stage_out(head_dim: int, block_n: int, stages: int, n_consumers: int = 2) -> bool:
    """Whether the output's 64-row scratch tile (2-byte elements) fits in shared memory beside
    the Q tiles and the K/V ring (with one consumer, in half of it: two programs per SM): not
    beside the paged chunks' 3-stage ring at D 128 (224 KB), where the kernel stores from
    wgmma's layout instead. (That ring's 2-5% was measured against two stages storing the same
    way; two stages with the staged store are not timed against it.)"""
    tile = 2 * head_dim  # bytes per row
    need = ((n_consumers + 1) * BLOCK_M + 2 * stages * block_n) * tile + 1024
    return need <= SHARED_MEMORY // (3 - n_consumers)


# ---------------------------------------------------------------------------------------------
# The guarded entries: this kernel, then the fixup launch over its flags (hopper_prefill_fixup)
# ---------------------------------------------------------------------------------------------

def prefill_guarded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                    scale: float, causal: bool = True, block_table=None, out=None,
                    min_q: int = 0, n_consumers: int | None = None,
                    pack: int | None = None, sinks=None, return_lse: bool = False, lse=None):
    """:func:`prefill` with the contract's rule for non-finite values: a NaN or +-Inf value
    row reaches only the query rows that see it. Two launches, the same every call (no host
    sync, CUDA-graph safe): this kernel, which flags every 16 rows whose output is not finite
    (a leak shows there, see the kernel's docstring), then :func:`fixup`, which rewrites the
    half tiles holding them with the isolating FA2-style kernel and otherwise returns after one
    load per program. Same arguments as :func:`prefill`; returns ``out``, or with
    ``return_lse`` ``(out, lse)`` (``lse`` float32 ``[Tq, H]``: given, contiguous, or
    allocated). A paged cache TMA cannot read (see :func:`cache_reason`, or a base not
    16-byte aligned) is served by the FA2-style kernel alone (all of it, ``min_q`` or not: the
    rows it rewrites are the same)."""
    import torch
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if return_lse and lse is None:
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    done = (out, lse) if return_lse else out
    if _nothing_to_launch(q, k, cu_seqlens_q, block_table):
        prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                block_table, out, lse=lse if return_lse else None)  # the host-side result
        return done
    if block_table is not None and ((k.data_ptr() | v.data_ptr()) % 16 or cache_reason(k, v)):
        from attn_ops.backends.triton import prefill_kernel
        return prefill_kernel.prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, scale, causal, block_table, sinks=sinks,
                                      return_lse=return_lse, out=out, lse=lse)
    n_consumers, pack = form(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal,
                             block_table, min_q, n_consumers, pack)
    shape = flags_shape(max_seqlen_q, cu_seqlens_q.shape[0] - 1, q.shape[1], n_consumers)
    flags = torch.empty(shape, dtype=torch.int32, device=q.device)  # the kernel writes each
    lse = lse if return_lse else None
    prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
            block_table, out, flags, min_q, n_consumers, pack, sinks, lse)
    fixup(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, causal, out, flags,
          rows=n_consumers * BLOCK_M // 2, block_table=block_table, sinks=sinks, lse=lse)
    return done


def bind_prefill_guarded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                         max_seqlen_k: int, scale: float, causal: bool = True,
                         block_table=None, min_q: int = 0, n_consumers: int | None = None,
                         pack: int | None = None, sinks=None, return_lse: bool = False):
    """:func:`prefill_guarded` for the call signature of these arguments (shapes, strides,
    dtypes, devices, scalars): the plan, the layouts, both grids and every non-pointer argument
    computed once, both launches prepared (launch.prepare: the compiled launchers are called
    directly once the first call has compiled them). A call allocates the output, takes the
    flags (split_counters.scratch: kept per stream for eager calls, no memset), wraps q/k/v in
    descriptors whose fields are set directly (fixed by the signature but for the base) and
    makes the two launches, each through the launcher's C function (raw_launch: a descriptor
    encoded once per base address). Once both launches are pinned, a call reads each address
    once and fires both from them (raw_launch's ``at``: no descriptor objects, eight address
    reads for twenty (and the sinks' with them), one device, hook and stream check for the
    two). 2 x 256 prompts, H200
    hosts, in one process: 15.1-25.6 us per call against 21.0-36.2 through the prepared
    launchers (28-34% less; the hosts' speed varies by half from one to the next), of which the
    two C launch functions are 8.6-14.4 (BENCHMARKS.md, twenty-seventh pass). Before the
    prepared launchers: 30 through Triton's Python launcher, which encoded every descriptor
    per call; 133-270 for :func:`prefill_guarded` (Gluon's ``JITFunction.run`` with three
    descriptors alone cost 86-145 us per launch).

    The function returned takes prefill's positional arguments (of those past
    ``block_table``, ``sinks`` read, the rest at the defaults this route serves), or them up to
    ``block_table`` and ``sinks=`` (the signature's: present or not), and ``out=`` (contiguous
    ``[Tq, H, D]``, written in place) and ``lse=`` (contiguous float32 ``[Tq, H]``): the split
    route passes the unified kernel's. It returns ``out``, or ``(out, lse)`` where the
    signature has ``return_lse``. Calls the signature
    cannot serve directly (traced, tensor subclasses, q/k/v whose heads are not packed or whose
    base is not 16-byte aligned) take :func:`prefill_guarded`."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from attn_ops.backends.triton import launch
    from attn_ops.backends.triton.split_counters import capturing, scratch, scratch_on
    from attn_ops.backends.triton.prefill_kernel import _prefill_kernel
    paged = block_table is not None
    if (_nothing_to_launch(q, k, cu_seqlens_q, block_table) or not heads_packed(q) or not (
            cache_reason(k, v) is None if paged else heads_packed(k) and heads_packed(v))):
        if min_q or n_consumers or pack or return_lse:
            return functools.partial(prefill_guarded, min_q=min_q, n_consumers=n_consumers,
                                     pack=pack, return_lse=return_lse)
        return prefill_guarded
    n_consumers, pack = form(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal,
                             block_table, min_q, n_consumers, pack)
    out_strides = torch.empty(q.shape, device="meta").stride()  # a fresh contiguous output's
    grid, scalars, consts, shape, blocks = _plan(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                 scale, causal, out_strides, block_table, min_q,
                                                 n_consumers, max_seqlen_k, pack, sinks,
                                                 return_lse)
    # What TensorDescriptor's constructor checks is fixed here (packed heads, 16-byte rows, a
    # shape with rows) but for the base's alignment, which each call checks.
    desc_q, desc_k, desc_v = (
        descriptor_maker(TensorDescriptor, *row_matrix(x), [rows, q.shape[2]], layout)
        for x, (rows, layout) in zip((q, k, v), (blocks[0], blocks[1], blocks[1])))
    # Alignment checked per call: cu_seqlens, the table and the sinks (positions 4, 5, 7, 9);
    # out, flags and the lse are fresh allocations (or the split route's, likewise), the
    # descriptors' bases are checked below.
    has_sinks = sinks is not None
    gluon = launch.prepare(hopper_prefill_kernel, grid, consts, (4, 5, 7) + (9,) * has_sinks,
                           scalars)
    lse_like = q if return_lse else None  # the fixup's plan reads only its dtype and device
    f_grid, f_consts, f_scalars = fixup_launch_args(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                    max_seqlen_q, scale, causal, shape[0],
                                                    n_consumers * BLOCK_M // 2,
                                                    block_table=block_table,
                                                    flags_per_half=shape[3] // 2, sinks=sinks,
                                                    lse=lse_like)
    fix = launch.prepare(_prefill_kernel, f_grid, f_consts,
                         (0, 1, 2, 4, 5, 6) + (8,) * has_sinks, f_scalars)
    lse_shape, f32 = q.shape[:2], torch.float32
    empty, empty_like, flag_count = torch.empty, torch.empty_like, math.prod(shape)
    out_shape, dtype, device = q.shape, q.dtype, q.device
    like_q = q.stride() == out_strides
    tensor, depth = torch.Tensor, torch._C._len_torch_dispatch_stack
    stats = launch.stats
    # The flags' buffer and address per stream, once a direct call has taken them: the kept
    # scratch (held here, so the address stays valid if the shared buffer grows for another
    # signature: launches on one stream run in order, whichever buffer they use).
    flags_at: dict = {}

    def run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
            causal=True, block_table=None, window_left=-1, softcap=0.0, sinks=None,
            k_scale=None, v_scale=None, return_lse=False, *, out=None, lse=None):
        # The op's arguments as the dispatch memo passes them (window_left, softcap and the
        # scales at the defaults this route serves; return_lse the signature's).
        direct = type(q) is tensor and not depth()  # neither a subclass nor traced
        if direct:
            pq, pk, pv = q.data_ptr(), k.data_ptr(), v.data_ptr()
            direct = not (pq | pk | pv) & 15
            if has_sinks:
                psk = sinks.data_ptr()
                direct = direct and not psk & 15
        if not direct:
            return prefill_guarded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, scale, causal, block_table, out, min_q,
                                   n_consumers, pack, sinks, with_lse, lse)
        stats["bound"] += 1
        if out is None:
            out = empty_like(q) if like_q else empty(out_shape, dtype=dtype, device=device)
        if with_lse and lse is None:
            lse = empty(lse_shape, dtype=f32, device=device)
        table = block_table if paged else cu_seqlens_k
        # Both launches pinned: from the addresses, each read once (8 reads for 20 through the
        # launchers, no descriptor object), one device, hook and stream check for the two.
        # Being captured (fresh flags) or under a launch hook: the launchers' path below.
        if gluon.at is not None and fix.at is not None and not capturing():
            stream = launch.direct_stream(gluon.device)
            pc, pck, pt = cu_seqlens_q.data_ptr(), cu_seqlens_k.data_ptr(), table.data_ptr()
            if stream is not None and not (pc | pck | pt) & 15:
                po = out.data_ptr()
                held = flags_at.get(stream)
                if held is None:
                    flags = scratch_on(flag_count, device, stream)
                    held = flags_at[stream] = (flags, flags.data_ptr())
                pf = held[1]
                pl = lse.data_ptr() if with_lse else pq
                ps = psk if has_sinks else pq
                gluon.at((pq, pk, pv, po, pc, pck, pf, pt, pl, ps), stream)
                fix.at((pq, pk, pv, po, pc, pck, pt, pl, ps, pq, pq, pf), stream)
                stats["direct"] += 2
                stats["raw"] += 2
                return (out, lse) if with_lse else out
        flags = scratch(flag_count, device)  # kept per stream: each flag is written
        lse_t, sinks_t = extra_pointers(q, sinks, lse if with_lse else None)
        gluon((desc_q(q), desc_k(k), desc_v(v), out, cu_seqlens_q, cu_seqlens_k, flags, table,
               lse_t, sinks_t))
        fix((q, k, v, out, cu_seqlens_q, cu_seqlens_k, table, lse_t, sinks_t, q, q, flags))
        return (out, lse) if with_lse else out
    with_lse = bool(return_lse)
    run.routes_traced = True  # takes the op's arguments, sends traced calls on (see above)
    return run
