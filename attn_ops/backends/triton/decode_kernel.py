"""Paged decode as flash decoding: split-KV partials (stage 1) merged by log-sum-exp (stage 2).

Stage 1, grid ``(S, Hkv, B)``: program ``(s, g, b)`` takes split s of sequence b's visible keys
for kv head g, and the GROUP query heads that share it packed as the rows of one tile, so each K/V
tile is loaded once for the whole group. It writes a normalised partial output and its log2-sum-
exp. Stage 2, grid ``(B * H,)``, merges the S partials of each head.

CUDA-graph safety: the split count S is a pure function of static shapes (B, Hkv, block-table
width, page size) and the device's SM count, so grids never depend on data. Each program reads
its sequence's length on the device and takes ``ceil(len / S)`` keys (rounded up to BLOCK_N);
splits past the end see no key and write lse = -inf, which the merge weighs as zero. A sequence
of length 0 gives zeros. With S = 1 stage 1 writes the output directly (one launch).

Every sequence gets the same S, so a long sequence among short ones runs on its S programs per
kv head while the rest idle; where the plan says so (:func:`_plan`, decode_plan.BALANCED),
stage 1 is instead decode_balanced_kernel.py, which deals the batch's key tiles out evenly over
as many programs. Both run decode_keys.attend_keys over their keys.

On an sm90 GPU a plain half-precision decode (no window, softcap, sinks, lse, FP8 cache or
override) whose caches TMA can read goes to the Gluon Hopper decode instead
(hopper_decode_launch, :func:`hopper_route`; decode_plan.HOPPER_DECODE says where and why).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from attn_ops.backends.triton.decode_balanced_kernel import decode_balanced_kernel
from attn_ops.backends.triton.decode_plan import (DEFAULT_CONFIG, DEFAULT_RESIDENT,
                                                  FP8_DEEP_CONFIG, Config, balanced_applies,
                                                  balanced_default, fp8_deep_splits,
                                                  half_precision_row, hopper_decode_applies,
                                                  launch_config,
                                                  num_splits, zeros_first)
from attn_ops.backends.triton.launch import launch, prepare
from attn_ops.backends.triton.merge_kernel import (merge_last_split, merge_last_split_call,
                                                  merge_splits_kernel)

from attn_ops.backends.triton import common
from attn_ops.backends.triton.common import (INTERPRET, device_has_pdl, device_sm_count,
                                             dot_mode, extras, gdc_wait, kv_same_strides,
                                             next_pow2, pdl_launch, result, softcap_constants)
from attn_ops.backends.triton.decode_keys import attend_keys
from attn_ops.backends.triton.softmax import finish, store_lse
from attn_ops.backends.triton.split_counters import partials, semaphores


@triton.jit(do_not_specialize=["window_left", "num_splits"])
def _decode_split_kernel(Q, K, V, SEQLENS, TABLE, OUT, O_PART, LSE_PART, SEMA, LSE,
                         SINK_LOGITS, K_SCALE, V_SCALE,
                         stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb,
                         stride_vt, stride_vh, stride_sl, stride_tb, stride_tc, stride_ob,
                         stride_oh, stride_sk, stride_ks, stride_vs, num_splits,
                         qk_scale, cap_log2, cap_inv, window_left,
                         GROUP: tl.constexpr, G_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                         D_P2: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                         DIRECT: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                         FUSED: tl.constexpr, DOT: tl.constexpr, HAS_SINKS: tl.constexpr,
                         FP8: tl.constexpr, WITH_LSE: tl.constexpr,
                         FP8_VIA_F16: tl.constexpr = False, FP8_PAIRS: tl.constexpr = False,
                         PAIR_ASM: tl.constexpr = False, R_P2: tl.constexpr = 1,
                         S_P2: tl.constexpr = 1, CHUNKS: tl.constexpr = 1,
                         KV_SAME_STRIDES: tl.constexpr = False, PDL: tl.constexpr = False):
    if PDL:  # a programmatic dependent launch: nothing is read before the kernel before it ends
        gdc_wait()
    split = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    seq_len = tl.load(SEQLENS + seq.to(tl.int64) * stride_sl)
    first = 0
    if WINDOW:  # the query (position seq_len - 1) sees keys >= seq_len - 1 - window_left
        first = tl.maximum(seq_len - 1 - window_left, 0)
    chunk = tl.cdiv(tl.cdiv(seq_len - first, num_splits), BLOCK_N) * BLOCK_N
    lo = first + split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    offs_g = tl.arange(0, G_P2)
    offs_d = tl.arange(0, D_P2)
    g_ok = offs_g < GROUP
    dim_ok = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    acc, m_i, l_i, v_scale = attend_keys(
        tl.zeros([G_P2, D_P2], dtype=tl.float32), tl.full([G_P2], float("-inf"), tl.float32),
        tl.zeros([G_P2], dtype=tl.float32), Q, K, V, TABLE, K_SCALE, V_SCALE,
        seq.to(tl.int64) * stride_qb + heads * stride_qh, seq, kv_head, g_ok, dim_ok, lo, hi,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_tb, stride_tc,
        stride_ks, stride_vs, qk_scale, cap_log2, cap_inv, G_P2, HEAD_DIM, D_P2, PAGE, BLOCK_N,
        SOFTCAP, DOT, FP8, FP8_VIA_F16, FP8_PAIRS, PAIR_ASM, KV_SAME_STRIDES)

    out_mask = g_ok[:, None] & dim_ok[None, :]
    lse_idx = seq.to(tl.int64) * num_heads + heads
    o_ptrs = OUT + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    sink2 = 0.0
    if HAS_SINKS:
        sink2 = tl.load(SINK_LOGITS + heads * stride_sk, mask=g_ok, other=0.0)
        sink2 = sink2 * 1.4426950408889634  # log2(e)
    if DIRECT:  # no key: zeros, lse -inf
        factor, lse2 = finish(m_i, l_i, sink2, v_scale, HAS_SINKS)
        tl.store(o_ptrs, (acc * factor[:, None]).to(OUT.dtype.element_ty), mask=out_mask)
        store_lse(LSE, lse_idx, lse2, g_ok, WITH_LSE)
    else:  # partials without the sink: it joins once, at the merge
        factor, lse2 = finish(m_i, l_i, sink2, v_scale, False)
        part = lse_idx * num_splits + split  # [B, H, S] index
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc * factor[:, None],
                 mask=out_mask)
        tl.store(LSE_PART + part, lse2, mask=g_ok)
        if FUSED and WITH_LSE:  # the last split of (seq, kv head) merges; no second launch
            merge_last_split_call(SEMA, seq * tl.num_programs(1) + kv_head, O_PART, LSE_PART,
                                  OUT, LSE, SINK_LOGITS, seq, kv_head * GROUP,
                                  seq.to(tl.int64) * num_heads + kv_head * GROUP, num_splits,
                                  stride_ob, stride_oh, stride_sk, GROUP, R_P2, HEAD_DIM, D_P2,
                                  S_P2, CHUNKS, HAS_SINKS, WITH_LSE)
        elif FUSED:
            merge_last_split(SEMA, seq * tl.num_programs(1) + kv_head, O_PART, LSE_PART, OUT,
                             LSE, SINK_LOGITS, seq, kv_head * GROUP,
                             seq.to(tl.int64) * num_heads + kv_head * GROUP, num_splits,
                             stride_ob, stride_oh, stride_sk, GROUP, R_P2, HEAD_DIM, D_P2, S_P2,
                             CHUNKS, HAS_SINKS, WITH_LSE)


# Merge the splits in stage 1 (merge_kernel.merge_last_split; counters: split_counters), not in a
# second launch, up to _FUSED_MAX_SPLITS splits. H200 graph replays vs the launch: bf16 B 8 x 4096
# (2 splits) 40.1 vs 42.6 us, B 4 x 8192 (4) 40.2 vs 42.4, B 16 x 2048 (2) 40.2 vs 41.0; FP8 B 16 x
# 4096 (4) 43.3 vs 44.9, x 8192 75.6 vs 77.2, B 32 x 8192 (2) 138.8 vs 140.0; counters zeroed per
# call lose (42.0 vs 41.0). Past 8 splits too, since the merge's counter
# (split_counters.last_to_count_in) and its chunked loads (MERGE_CHUNK): 16 splits (B 1 x 2048)
# 12.19 vs 12.54, 32 (B 1 x 32768) 40.61 vs 40.99, 17 (B 3 x 8192) 34.94 vs 35.90, 10 (B 5 x 8192)
# 50.11 vs 51.30 (before it, 16 splits at B 1 x 32k: 43.6 vs 42.7). The counters are kept
# (split_counters.semaphores): per stream for eager calls, per captured call in a CUDA graph, so
# graphs replayed at once on two streams never share one.
FUSED_MERGE = True
_FUSED_MAX_SPLITS = 64
# Splits the fused merge loads per trip to L2 (merge_kernel.merge_last_split).
MERGE_CHUNK = 8
# FP8 caches with bf16 queries: widen the cache to fp16 (one cvt per pair of e4m3 values on
# sm89+) and run the MMAs in fp16, with q rescaled per row into fp16's range, instead of widening
# to bf16 (a longer conversion sequence per element on sm90, in the loop that must only load).
FP8_VIA_F16 = True
# FP8 caches read as int16 pairs: each K and V tile is two fp16 tiles, each product two dots.
# V's are the even and the odd columns (fp8_widening.fp8_pair_tile; the output's two halves are
# interleaved once at the end), K's the halves of every four bytes (fp8_widening.fp8_key_tile, q
# split alike: ``q.k = q_a.k_a + q_b.k_b``), which need no byte permute: 738 -> 706 instructions
# per step of the FP8 deep row (sm_90a), H200 B 64 x 4096 134.3 -> 133.0 us, 128 x 4096 260.5
# -> 258.4, B 16 x 4096 40.3 -> 40.1 (BENCHMARKS.md, nineteenth pass). Why pairs: Triton read
# the FP8 V tile from shared memory one byte at a time (128 LDS.U8 + 64 IMADs per thread per
# 128-key tile), 16-bit pairs load with the transposing matrix load. sm_90a: 1355 -> 796
# instructions per tile in the loop (bf16: 1146 per 128 keys); H200, B 16 x 8192: 115.4 -> 78.0
# us, 64 x 4096: 215.0 -> 138.1. Needs an fp16 MMA (fp16 q, or bf16 q with FP8_VIA_F16), an
# even head dim, even cache strides and 2-byte aligned caches (else the one-tile path).
FP8_PAIRS = True


@functools.lru_cache(maxsize=1024)
def _plan(batch: int, num_heads: int, num_kv_heads: int, head_dim: int, page: int, width: int,
          dtype: torch.dtype, device: torch.device, window: bool, softcap: bool,
          config: Config | None, splits: int | None, fused: bool, cache_dtype: torch.dtype,
          fp8_via_f16: bool, fp8_pairs: bool = False, balanced: bool | None = None,
          programs: int | None = None, pdl: bool = False):
    """``(splits, kernel, grid1, grid2, stage1, stage2)`` from static facts only (cached: ~1 us
    per call): the split count, stage 1's kernel, the grids and the constexprs. ``balanced``
    (None: decode_plan.balanced_default) picks the balanced kernel, over as many programs as
    the split kernel would launch (``programs``: that many), where it can run
    (decode_plan.balanced_applies). ``pdl``: stage 1 as a programmatic dependent launch, where
    the device has it (:data:`.common.LAUNCH_PDL`)."""
    fp8 = cache_dtype == torch.float8_e4m3fn
    cfg = config or launch_config(head_dim, dtype, fp8)
    # The deep rows (decode_plan: half_precision_row, fp8_deep_splits) for a GPU's
    # half-precision q when nothing is forced
    rows = (config is None and splits is None and not INTERPRET and head_dim <= 128
            and dtype in (torch.float16, torch.bfloat16))
    if rows and fp8:
        fp8_splits = fp8_deep_splits(batch * num_kv_heads, device_sm_count(device), width * page)
        if fp8_splits:
            splits, cfg = fp8_splits, FP8_DEEP_CONFIG
    elif rows:
        deep = half_precision_row(batch * num_kv_heads, device_sm_count(device), width * page)
        if deep:
            splits, cfg = deep
    if splits is None:
        splits = num_splits(batch, num_kv_heads, width * page, device_sm_count(device),
                            cfg.block_n, DEFAULT_RESIDENT if cfg == DEFAULT_CONFIG else 0)
    d_p2 = max(16, next_pow2(head_dim))
    group = num_heads // num_kv_heads
    fused = fused and 1 < splits <= _FUSED_MAX_SPLITS
    via_f16 = fp8 and fp8_via_f16 and dtype == torch.bfloat16
    pairs = (fp8 and fp8_pairs and head_dim % 2 == 0
             and (via_f16 or dtype == torch.float16))
    stage1 = dict(GROUP=group, G_P2=max(16, next_pow2(group)), HEAD_DIM=head_dim, D_P2=d_p2,
                  PAGE=page, BLOCK_N=cfg.block_n, SOFTCAP=softcap, WINDOW=window,
                  DOT=dot_mode(dtype), num_warps=cfg.warps, num_stages=cfg.stages,
                  FP8_VIA_F16=via_f16, FP8_PAIRS=pairs, PAIR_ASM=pairs and not INTERPRET,
                  R_P2=next_pow2(group),  # the merge's rows
                  **({} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg}),
                  **pdl_launch(pdl and device_has_pdl(device)))
    stage2 = dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, D_P2=d_p2, S_P2=next_pow2(splits),
                  num_warps=4)
    if balanced is None:
        balanced = balanced_default(cfg, splits)
    if balanced and balanced_applies(batch, num_kv_heads, width * page, cfg):
        programs = programs or splits * num_kv_heads * batch
        return (splits, decode_balanced_kernel, (programs,), None,
                dict(stage1, B_P2=next_pow2(batch), ZEROS_FIRST=zeros_first(cfg)), stage2)
    chunk = min(next_pow2(splits), MERGE_CHUNK) if fused else 1
    stage1.update(DIRECT=splits == 1, FUSED=fused, S_P2=chunk,
                  CHUNKS=triton.cdiv(splits, chunk) if fused else 1)
    return (splits, _decode_split_kernel, (splits, num_kv_heads, batch), (batch * num_heads,),
            stage1, stage2)


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens_k: torch.Tensor,
           block_table: torch.Tensor, scale: float, window_left: int = -1, softcap: float = 0.0,
           sinks: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None, return_lse: bool = False,
           config: Config | None = None, splits: int | None = None,
           out: torch.Tensor | None = None, fused: bool | None = None,
           lse: torch.Tensor | None = None, fp8_via_f16: bool | None = None,
           fp8_pairs: bool | None = None, balanced: bool | None = None,
           programs: int | None = None, pdl: bool | None = None):
    """q ``[B, H, D]``; caches ``[blocks, page, Hkv, D]``; seqlens_k ``[B]`` int32; block_table
    ``[B, W]``. Returns ``[B, H, D]`` in q's dtype, and with ``return_lse`` also lse float32
    ``[B, H]`` (natural log; -inf for a row with no key). ``sinks`` float32 ``[H]``; float8_e4m3fn
    caches take ``k_scale``/``v_scale`` float32 ``[]``/``[Hkv]``, loaded as fp8 (half of bf16's
    bytes) and read as ``x * scale``. Every index tensor and cache is read through its strides
    (any strided view with a contiguous last dim; see store_kernel for why not a copy).

    ``config``/``splits`` override the static tables; ``out`` (contiguous ``[B, H, D]``) and
    ``lse`` (contiguous float32 ``[B, H]``) receive the results (tests poison them); ``fused``,
    ``fp8_via_f16``, ``fp8_pairs`` override :data:`FUSED_MERGE`, :data:`FP8_VIA_F16` (how an FP8
    cache is widened for bf16 queries), :data:`FP8_PAIRS` (int16 pair reads where allowed);
    ``balanced`` picks stage 1's kernel (None: :func:`.decode_plan.balanced_default`; True
    takes the balanced kernel wherever :func:`.decode_plan.balanced_applies`); ``programs``
    overrides the balanced kernel's program count (any count: it deals tiles, not pairs);
    ``pdl`` overrides :data:`.common.LAUNCH_PDL`.
    """
    batch, num_heads, head_dim = q.shape
    forced = (config, splits, fused, fp8_via_f16, fp8_pairs, balanced, programs, pdl, lse)
    if all(x is None for x in forced) and hopper_route(
            q, k_cache, v_cache, block_table, window_left, softcap, sinks, k_scale, return_lse):
        from attn_ops.backends.triton import hopper_decode_launch
        return hopper_decode_launch.decode(q, k_cache, v_cache, seqlens_k, block_table, scale,
                                           out)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ex = extras(q, k_cache, sinks, k_scale, v_scale, return_lse, lse)
    if batch == 0:
        return result(out, ex)
    if k_cache.numel() == 0 or block_table.numel() == 0:
        return result(out, ex, nothing_seen=True)  # nothing can be cached: every length is 0
    splits, kernel, grid1, grid2, stage1, stage2 = _plan(
        batch, num_heads, k_cache.shape[2], head_dim, k_cache.shape[1], block_table.shape[1],
        q.dtype, q.device, window_left >= 0, softcap > 0,
        None if config is None else Config(*config), splits,
        FUSED_MERGE if fused is None else fused, k_cache.dtype,
        FP8_VIA_F16 if fp8_via_f16 is None else fp8_via_f16,
        (FP8_PAIRS if fp8_pairs is None else fp8_pairs) and k_cache.dtype == torch.float8_e4m3fn
        and _pairs_ok(k_cache, v_cache) and _even(k_cache, v_cache), balanced, programs,
        common.LAUNCH_PDL if pdl is None else pdl)
    balanced = kernel is decode_balanced_kernel
    shapes = _part_shapes(batch, num_heads, head_dim, splits, balanced, grid1, k_cache.shape[2])
    if shapes is None:
        o_part = lse_part = out  # unused pointer arguments
    else:
        o_part, lse_part = partials(*shapes, q.device)
    counted = balanced or stage1["FUSED"]  # pieces merged in stage 1, by a counter
    sema = semaphores(batch * k_cache.shape[2], q.device) if counted else seqlens_k
    launch(kernel, grid1, q, k_cache, v_cache, seqlens_k, block_table, out, o_part, lse_part,
           sema, *ex.pointers, *((seqlens_k,) if balanced else ()),  # CU_Q: unused
           *_stage1_scalars(q, k_cache, v_cache, seqlens_k, block_table, out.stride(), ex,
                            splits, scale, softcap, window_left, balanced), **stage1, **ex.flags,
           KV_SAME_STRIDES=kv_same_strides(k_cache, v_cache))
    if splits > 1 and not counted:
        launch(merge_splits_kernel, grid2, o_part, lse_part, out, *ex.pointers[:2],
               splits, out.stride(0), out.stride(1), ex.strides[0], **stage2,
               HAS_SINKS=ex.flags["HAS_SINKS"], WITH_LSE=ex.flags["WITH_LSE"])
    return result(out, ex)


def hopper_route(q, k_cache, v_cache, block_table, window_left=-1, softcap=0.0, sinks=None,
                 k_scale=None, return_lse=False) -> bool:
    """Whether the Gluon Hopper decode takes this call: a plain one (no window, softcap,
    sinks, FP8 scales or lse) of real CUDA tensors on an sm90 GPU, outside any dispatch mode (a
    triton_op traced by AOTAutograd keeps the Triton kernels, which Inductor can launch), of
    shapes decode_plan.hopper_decode_applies gives it and hopper_decode_launch serves, over
    caches it reads right (base addresses included)."""
    if (window_left >= 0 or softcap > 0 or sinks is not None or k_scale is not None
            or return_lse or type(q) is not torch.Tensor or q.device.type != "cuda"
            or torch._C._len_torch_dispatch_stack() or q.shape[0] == 0
            or not hopper_decode_applies(q.shape[0], k_cache.shape[2],
                                         device_sm_count(q.device))):
        return False
    from attn_ops.backends.triton import hopper_decode_launch as hd
    return (hd.available(q.device) and hd.shape_reason(q, k_cache, block_table) is None
            and hd.cache_reason(k_cache, v_cache, block_table) is None)


def _pairs_ok(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether both caches' block, in-page and head strides are even (FP8_PAIRS reads int16)."""
    return all(st % 2 == 0 for st in (*k_cache.stride()[:3], *v_cache.stride()[:3]))


def _even(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether both caches start at an even address (a view can start at any element): only
    FP8 caches can start at an odd one, and a traced (fake) cache has no address, so its
    storage offset stands in (allocations are aligned far beyond 2 bytes)."""
    if k_cache.element_size() > 1 and v_cache.element_size() > 1:
        return True
    if torch._C._len_torch_dispatch_stack() or not k_cache.device.type == "cuda":
        return (k_cache.storage_offset() | v_cache.storage_offset()) & 1 == 0
    return (k_cache.data_ptr() | v_cache.data_ptr()) & 1 == 0


def _stage1_scalars(q, k_cache, v_cache, seqlens_k, block_table, out_strides, ex, splits, scale,
                    softcap, window_left, balanced) -> tuple:
    """Stage 1's arguments after its pointers (13; the balanced kernel's 14): strides, the
    split count (the balanced kernel: the batch and kv head counts), scalars (the balanced
    kernel's two unused few-query ones last)."""
    qk_scale, cap_log2, cap_inv = softcap_constants(scale, softcap)
    counts = (q.shape[0], k_cache.shape[2]) if balanced else (splits,)
    return (q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
            seqlens_k.stride(0), *block_table.stride(), out_strides[0], out_strides[1],
            *ex.strides, *counts, qk_scale, cap_log2, cap_inv, window_left,
            *((0, q.shape[0]) if balanced else ()))


def _part_shapes(batch: int, num_heads: int, head_dim: int, splits: int,
                 balanced: bool, grid: tuple, num_kv_heads: int) -> tuple | None:
    """The float32 partials' shapes (outputs, log2-sum-exps), or None when stage 1 writes
    none: the split kernel's ``[B, H, S]`` rows, the balanced kernel's two slots of a GQA
    group's rows per program (``grid[0]`` programs; any of them may end up holding a piece)."""
    if balanced:
        rows = 2 * grid[0] * (num_heads // num_kv_heads)
        return (rows, head_dim), (rows,)
    if splits == 1:
        return None
    return (batch, num_heads, splits, head_dim), (batch, num_heads, splits)


def bind_decode(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left=-1, softcap=0.0,
                sinks=None, k_scale=None, v_scale=None, return_lse=False):
    """:func:`decode` (default tables, no overrides) for the call signature of these arguments.

    Everything that depends only on the signature (shapes, strides, dtypes, devices, scalars,
    which of sinks / FP8 scales / lse are present) is computed here, once: the plan, the
    kernels' non-pointer arguments, the prepared launches (:func:`launch.prepare`). The
    function returned allocates the outputs, takes the split partials and the semaphores
    kept for the current stream (split_counters), and launches; call it only with arguments
    of this signature (the registry's dispatch memo guarantees it).
    """
    batch, num_heads, head_dim = q.shape
    if batch == 0 or k_cache.numel() == 0 or block_table.numel() == 0:
        return decode  # nothing to launch: the wrapper's host-side result
    if hopper_route(q, k_cache, v_cache, block_table, window_left, softcap, sinks, k_scale,
                    return_lse):
        from attn_ops.backends.triton import hopper_decode_launch
        run = hopper_decode_launch.bind_decode(q, k_cache, v_cache, seqlens_k, block_table,
                                               scale, fallback=decode)
        run.routes_traced = True  # its fallback, decode, routes traced calls
        return run
    ex = extras(q, k_cache, sinks, k_scale, v_scale, return_lse)
    splits, kernel, grid1, grid2, stage1, stage2 = _plan(
        batch, num_heads, k_cache.shape[2], head_dim, k_cache.shape[1], block_table.shape[1],
        q.dtype, q.device, window_left >= 0, softcap > 0, None, None, FUSED_MERGE,
        k_cache.dtype, FP8_VIA_F16, FP8_PAIRS and _pairs_ok(k_cache, v_cache),
        pdl=common.LAUNCH_PDL)
    balanced = kernel is decode_balanced_kernel
    shape, dtype, device = q.shape, q.dtype, q.device
    out_strides = torch.empty(shape, device="meta").stride()  # a fresh contiguous output's
    scalars1 = _stage1_scalars(q, k_cache, v_cache, seqlens_k, block_table, out_strides, ex,
                               splits, scale, softcap, window_left, balanced)
    has_sinks, fp8, with_lse = ex.flags["HAS_SINKS"], ex.flags["FP8"], ex.flags["WITH_LSE"]
    pairs = stage1["FP8_PAIRS"]  # int16 reads: 2-byte aligned caches, checked per call
    # Alignment checked per call: the caller's tensors (q stands in for what is absent).
    check = (0, 1, 2, 3, 4) + ((10,) if has_sinks else ()) + ((11, 12) if fp8 else ())
    consts1 = {**stage1, **ex.flags, "KV_SAME_STRIDES": kv_same_strides(k_cache, v_cache)}
    stage1_launch = prepare(kernel, grid1, consts1, check, scalars1)
    counted = balanced or stage1["FUSED"]  # pieces merged in stage 1, by a counter
    merge = splits > 1 and not counted
    scalars2 = (splits, out_strides[0], out_strides[1], ex.strides[0])
    merge_launch = prepare(merge_splits_kernel, grid2, dict(stage2, HAS_SINKS=has_sinks,
                                                      WITH_LSE=with_lse),
                           (4,) if has_sinks else (), scalars2) if merge else None
    part_shapes = _part_shapes(batch, num_heads, head_dim, splits, balanced, grid1,
                               k_cache.shape[2])
    lse_shape, sema_count = (batch, num_heads), batch * k_cache.shape[2]
    empty, empty_like, f32 = torch.empty, torch.empty_like, torch.float32
    like_q = q.stride() == out_strides  # empty_like(q): ~0.9 us less than empty(shape, ...)
    from attn_ops.backends.triton.launch import stats
    tensor, depth = torch.Tensor, torch._C._len_torch_dispatch_stack

    def run(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left=-1, softcap=0.0,
            sinks=None, k_scale=None, v_scale=None, return_lse=False):
        if type(q) is not tensor or depth() or pairs and (  # traced, a subclass, or
                k_cache.data_ptr() | v_cache.data_ptr()) & 1:  # odd caches: the wrapper
            return decode(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left,
                          softcap, sinks, k_scale, v_scale, with_lse)
        stats["bound"] += 1
        out = empty_like(q) if like_q else empty(shape, dtype=dtype, device=device)
        lse = empty(lse_shape, dtype=f32, device=device) if with_lse else q
        if part_shapes is None:
            o_part = lse_part = out  # unused pointer arguments
        else:
            o_part, lse_part = partials(*part_shapes, device)
        sink = sinks if has_sinks else q
        stage1_launch((q, k_cache, v_cache, seqlens_k, block_table, out, o_part, lse_part,
                       semaphores(sema_count, device) if counted else seqlens_k, lse, sink,
                       k_scale if fp8 else q, v_scale if fp8 else q)
                      + ((seqlens_k,) if balanced else ()))  # the balanced kernel's CU_Q
        if merge:
            merge_launch((o_part, lse_part, out, lse, sink))
        return (out, lse) if with_lse else out
    run.routes_traced = True  # the dispatch memo may call it directly (triton.bind_args)
    return run
