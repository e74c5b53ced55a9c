"""Host side of the unified kernel's launches (:mod:`.unified_kernel`): the arguments of one
launch, the launch itself for the wrapper functions, and :func:`bind_prefill`, the launch bound
to one call signature that the Triton backend's ``bind()`` uses for the prefills the unified
kernel serves.

Imported by the kernel module when it is first used; it reads the kernels and the plan through
that module at call time (the two import each other).
"""

from __future__ import annotations

import torch

from attn_ops.backends.triton import unified_kernel as uk, unified_plan
from attn_ops.backends.triton.common import kv_same_strides, result, softcap_constants
from attn_ops.backends.triton.decode_balanced_kernel import decode_balanced_kernel
from attn_ops.backends.triton.launch import launch, prepare
from attn_ops.backends.triton.split_counters import semaphores


def launch_args(q, k, v, cu_q, cu_k, seqlens, table, num_seqs, max_seqlen_q, capacity, scale,
                decode, causal, paged, window_left, softcap, config, splits, out_strides, ex):
    """Everything of the launches but the tensors: ``(splits, grid, constexprs of the main
    kernel, its arguments after the 15 pointers, constexprs of the merge kernel, its arguments
    after the 6 pointers)``, and the table pointer (the block table, or cu_k standing in)."""
    total_q, num_heads, head_dim = q.shape
    if paged:
        page, num_kv_heads = k.shape[1], k.shape[2]
        kv_strides = (*k.stride()[:3], *v.stride()[:3])
        table_strides = table.stride()
    else:
        page, num_kv_heads = 1, k.shape[1]
        kv_strides = (0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1))
        table, table_strides = cu_k, (0, 0)  # unused pointer argument
    splits, grid, consts, merge = unified_plan.plan(
        total_q, num_seqs, num_heads, num_kv_heads, head_dim, int(max_seqlen_q), capacity,
        q.dtype, q.device, decode, bool(causal), paged, page, window_left >= 0, softcap > 0,
        None if config is None else unified_plan.Config(*config), splits)
    qk_scale, cap_log2, cap_inv = softcap_constants(scale, softcap)
    stride_cq = 0 if decode else cu_q.stride(0)
    stride_ck = 0 if decode else cu_k.stride(0)
    stride_sl = seqlens.stride(0) if decode else 0
    scalars = (q.stride(0), q.stride(1), *kv_strides, out_strides[0], out_strides[1], stride_cq,
               stride_ck, stride_sl, *table_strides, *ex.strides, total_q, num_seqs, splits,
               qk_scale, cap_log2, cap_inv, window_left)
    merge_scalars = (splits, total_q * num_heads, out_strides[0], out_strides[1], stride_cq,
                     ex.strides[0], num_seqs)
    merge = dict(merge, HAS_SINKS=ex.flags["HAS_SINKS"], WITH_LSE=ex.flags["WITH_LSE"])
    same = paged and kv_same_strides(k, v)  # dense K/V: unused
    return (splits, grid, {**consts, **ex.flags, "KV_SAME_STRIDES": same}, scalars, merge,
            merge_scalars, table)


def balanced_args(q, k, v, cu_q, cu_k, table, num_seqs, max_seqlen_q, capacity, scale, causal,
                  paged, window_left, softcap, config, splits, balanced, out_strides, ex):
    """The balanced kernel's launch for a few-query prefill (unified_plan.balanced_plan), or
    None: ``(grid, constexprs, arguments after the 14 pointers, partial shapes, counters)``.
    Overriding the unified kernel's ``config`` or ``splits`` keeps the unified kernel."""
    if config is not None or splits is not None or not paged:
        return None
    total_q, num_heads, head_dim = q.shape
    plan = unified_plan.balanced_plan(num_seqs, num_heads, k.shape[2], head_dim,
                                      int(max_seqlen_q), capacity, q.dtype, q.device,
                                      bool(causal), paged, window_left >= 0,
                                      k.dtype == torch.float8_e4m3fn, balanced)
    if plan is None:
        return None
    grid, consts = plan
    qk_scale, cap_log2, cap_inv = softcap_constants(scale, softcap)
    scalars = (q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3], cu_k.stride(0),
               *table.stride(), out_strides[0], out_strides[1], *ex.strides, num_seqs,
               k.shape[2], qk_scale, cap_log2, cap_inv, -1, cu_q.stride(0), total_q)
    rows = 2 * grid[0] * consts["G_P2"]  # two slots of G_P2 rows per program
    return (grid, {**consts, "PAGE": k.shape[1], "SOFTCAP": softcap > 0, **ex.flags,
                   "KV_SAME_STRIDES": kv_same_strides(k, v)}, scalars,
            ((rows, head_dim), (rows,)), num_seqs * k.shape[2])


def run(q, k, v, out, cu_q, cu_k, seqlens, table, num_seqs, max_seqlen_q, capacity, scale,
        decode, causal, paged, window_left, softcap, config, splits, ex, balanced=None):
    """The wrappers' launch (unified_kernel.prefill / decode): plan, partials, launches;
    ``balanced`` as unified_plan.balanced_plan's ``force`` (prefill only)."""
    bal = None if decode else balanced_args(
        q, k, v, cu_q, cu_k, table, num_seqs, max_seqlen_q, capacity, scale, causal, paged,
        window_left, softcap, config, splits, balanced, out.stride(), ex)
    if bal is not None:
        grid, consts, scalars, (part_shape, lse_part_shape), sema_count = bal
        launch(decode_balanced_kernel, grid, q, k, v, cu_k, table, out,
               torch.empty(part_shape, dtype=torch.float32, device=q.device),
               torch.empty(lse_part_shape, dtype=torch.float32, device=q.device),
               semaphores(sema_count, q.device), *ex.pointers, cu_q, *scalars, **consts)
        return result(out, ex)
    splits, grid, consts, scalars, merge, merge_scalars, table = launch_args(
        q, k, v, cu_q, cu_k, seqlens, table, num_seqs, max_seqlen_q, capacity, scale, decode,
        causal, paged, window_left, softcap, config, splits, out.stride(), ex)
    total_q, num_heads, head_dim = q.shape
    if splits == 1:
        o_part = lse_part = out  # unused pointer arguments
    else:
        o_part = torch.empty((splits, total_q * num_heads, head_dim), dtype=torch.float32,
                             device=q.device)
        lse_part = torch.empty((splits, total_q * num_heads), dtype=torch.float32,
                               device=q.device)
    fused = consts["FUSED"]
    sema = semaphores(grid[0] * grid[1], q.device) if fused else cu_q  # unused when not fused
    launch(uk._unified_kernel, grid, q, k, v, out, o_part, lse_part, sema, cu_q, cu_k, seqlens,
           table, *ex.pointers, *scalars, **consts)
    if splits > 1 and not fused:
        launch(uk._merge_kernel, (total_q * num_heads,), o_part, lse_part, out, cu_q,
               *ex.pointers[:2], *merge_scalars, **merge)
    return result(out, ex)


def bind_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                 causal=True, block_table=None, window_left=-1, softcap=0.0, sinks=None,
                 k_scale=None, v_scale=None, return_lse=False, *, config=None):
    """unified_kernel.prefill (default tables, or ``config``) for the call signature of these
    arguments: plan and every non-pointer argument computed once (see
    decode_kernel.bind_decode); the function returned allocates the outputs, the split
    partials, takes the semaphores of the current stream, and launches: the unified kernel, or
    the balanced kernel where the plan takes it for a few-query batch (:func:`balanced_args`).
    A ``config`` with no large path (``block_m`` 0) writes only the sequences its small path
    serves (the Triton backend's split route)."""
    total_q, num_heads, head_dim = q.shape
    num_seqs = cu_seqlens_q.shape[0] - 1
    paged = block_table is not None
    if total_q == 0 or k.numel() == 0 or num_seqs == 0 or (paged and block_table.numel() == 0):
        return uk.prefill  # nothing to launch: the wrapper's host-side result
    ex = uk.extras(q, k, sinks, k_scale, v_scale, return_lse)
    capacity = int(max_seqlen_k)
    if paged:
        capacity = min(capacity, block_table.shape[1] * k.shape[1])
    shape, dtype, device = q.shape, q.dtype, q.device
    out_strides = torch.empty(shape, device="meta").stride()  # a fresh contiguous output's
    bal = balanced_args(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, num_seqs, max_seqlen_q,
                        capacity, scale, causal, paged, window_left, softcap, config, None, None,
                        out_strides, ex)
    if bal is not None:  # the balanced kernel (few queries per sequence): one launch
        grid, consts, scalars, (part_shape, lse_part_shape), sema_count = bal
        fused, merge = True, False  # its pieces always merge by counter, in the launch
        # Alignment checked per call: the caller's tensors (q stands in for what is absent).
        check = ((0, 1, 2, 3, 4, 13) + ((10,) if consts["HAS_SINKS"] else ())
                 + ((11, 12) if consts["FP8"] else ()))
        go = prepare(decode_balanced_kernel, grid, consts, check, scalars)
    else:
        splits, grid, consts, scalars, merge_consts, merge_scalars, _ = launch_args(
            q, k, v, cu_seqlens_q, cu_seqlens_k, cu_seqlens_q, block_table, num_seqs,
            max_seqlen_q, capacity, scale, False, causal, paged, window_left, softcap, config,
            None, out_strides, ex)
        fused = consts["FUSED"]
        merge = splits > 1 and not fused
        # Alignment checked per call: the caller's tensors (out, lse, partials and semaphores
        # are fresh allocations; q and cu_seqlens_q stand in for what is absent).
        check = ((0, 1, 2, 7, 8) + ((10,) if paged else ())
                 + ((12,) if consts["HAS_SINKS"] else ()) + ((13, 14) if consts["FP8"] else ()))
        go = prepare(uk._unified_kernel, grid, consts, check, scalars)
        go_merge = prepare(uk._merge_kernel, (total_q * num_heads,), merge_consts,
                           (3,) + ((5,) if consts["HAS_SINKS"] else ()),
                           merge_scalars) if merge else None
        part_shape, lse_part_shape = ((splits, total_q * num_heads, head_dim),
                                      (splits, total_q * num_heads))
        sema_count = grid[0] * grid[1]
    has_sinks, fp8, with_lse = consts["HAS_SINKS"], consts["FP8"], consts["WITH_LSE"]
    balanced, parts = bal is not None, bal is not None or splits > 1
    empty, lse_shape, f32 = torch.empty, shape[:2], torch.float32
    empty_like, like_q = torch.empty_like, q.stride() == out_strides  # ~0.9 us less than empty
    from attn_ops.backends.triton.launch import stats
    tensor, depth = torch.Tensor, torch._C._len_torch_dispatch_stack

    def bound(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
              causal=True, block_table=None, window_left=-1, softcap=0.0, sinks=None,
              k_scale=None, v_scale=None, return_lse=False):
        if type(q) is not tensor or depth():  # traced or a subclass: the wrapper decides
            return uk.prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              scale, causal, block_table, window_left, softcap, sinks, k_scale,
                              v_scale, with_lse, config=config)
        stats["bound"] += 1
        out = empty_like(q) if like_q else empty(shape, dtype=dtype, device=device)
        lse = empty(lse_shape, dtype=f32, device=device) if with_lse else q
        if parts:
            o_part = empty(part_shape, dtype=f32, device=device)
            lse_part = empty(lse_part_shape, dtype=f32, device=device)
        else:
            o_part = lse_part = out  # unused pointer arguments
        sink = sinks if has_sinks else q
        sema = semaphores(sema_count, device) if fused else cu_seqlens_q
        if balanced:
            go((q, k, v, cu_seqlens_k, block_table, out, o_part, lse_part, sema, lse, sink,
                k_scale if fp8 else q, v_scale if fp8 else q, cu_seqlens_q))
        else:
            go((q, k, v, out, o_part, lse_part, sema, cu_seqlens_q, cu_seqlens_k, cu_seqlens_q,
                block_table if paged else cu_seqlens_k, lse, sink, k_scale if fp8 else q,
                v_scale if fp8 else q))
            if merge:
                go_merge((o_part, lse_part, out, cu_seqlens_q, lse, sink))
        return (out, lse) if with_lse else out
    bound.routes_traced = True  # the dispatch memo may call it directly (triton.bind_args)
    return bound
