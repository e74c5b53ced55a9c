"""Triton backend: fused store_kvcache, varlen (optionally paged) prefill, split-KV paged decode.

Runs on CUDA, and on CPU tensors through the Triton interpreter when ``TRITON_INTERPRET=1`` is
set before the kernels are first used (the CI path). Importing this package imports no triton:
the kernel modules (:mod:`.store_kernel`, :mod:`.prefill_kernel`, :mod:`.decode_kernel`,
:mod:`.unified_kernel`, :mod:`.merge_kernel`; named apart from the functions below so that
importing one does not rebind a package attribute) load on first call, with the pieces they
share (:mod:`.common`; :mod:`.softmax`: the key-tile step, the sink, the lse, the split merge).
Every attention kernel serves sinks, the lse (``prefill_with_lse`` / ``decode_with_lse``) and
float8_e4m3fn caches.

Eagerly the public ops (``attn::prefill`` etc.) choose their backend when they run, and the
kernels are launched through :mod:`.launch` (the compiled launcher called directly; pinned per
call signature by :func:`bind`). Under ``torch.compile(backend="attn_ops")`` the backend is
fixed per compile (one artifact per choice), and calls Triton serves become the ``triton_op``s
of :mod:`.triton_ops`, which Inductor launches from its generated code.
"""

from __future__ import annotations

import importlib.util
import os

import torch

name = "triton"

_DTYPES = ("torch.float16", "torch.bfloat16", "torch.float32")
from attn_ops.contract import MAX_HEAD_DIM as _MAX_HEAD_DIM  # the contract's bound


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(config) -> str | None:
    """None when this backend can run the call ``config`` (an ``OpConfig``) describes, else why."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton)"
    device = config.device
    if device.type == "cpu":
        if not interpreting():
            return ("CPU tensors run only through the Triton interpreter; set TRITON_INTERPRET=1 "
                    "before the first call")
    elif device.type != "cuda":
        return (f"device type {device.type!r} is not supported (cuda, or cpu with "
                "TRITON_INTERPRET=1)")
    if str(config.dtype) not in _DTYPES:
        return f"dtype {config.dtype} is not supported (float16, bfloat16, float32)"
    if config.op == "merge_states":
        return None  # a streaming kernel: any head dim, any strides with a contiguous last dim
    # Sinks, the lse (prefill_with_lse / decode_with_lse) and float8_e4m3fn caches (fp16/bf16
    # queries, the contract's only FP8 pairing) are served by every kernel the backend routes
    # to: dense and paged prefill, the unified kernel and the split-KV decode.
    if (config.fp8_cache and config.op != "store_kvcache"
            and config.dtype not in (torch.float16, torch.bfloat16)):
        return (f"FP8 (float8_e4m3fn) caches are read by float16/bfloat16 queries only, not "
                f"{config.dtype}")
    head_dim = config.head_dim
    if not 0 < head_dim <= _MAX_HEAD_DIM:
        return f"head dim {head_dim} is not supported (at most {_MAX_HEAD_DIM})"
    block_size = config.block_size
    if config.op == "decode" or config.paged:
        if block_size is None or block_size < 1:
            return f"block size {block_size} is not supported (a positive page size)"
    return None


def store_kvcache(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    from attn_ops.backends.triton import store_kernel
    store_kernel.store_kvcache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


# Which prefill kernel serves a call, from host-known shapes only (no sync; CUDA-graph safe).
# The unified kernel (GQA-packed rows, split-KV) serves few queries per sequence and batches that
# mix short and long sequences; the FA2-style prefill kernel keeps long uniform prompts, where
# its 128 x 128 tiles measured faster (H200, BENCHMARKS.md "One paged kernel ...").
_UNIFIED_MAX_ROWS = 64  # max_seqlen_q * G up to this: every sequence is one small tile
_UNIFIED_MAX_Q = 1024  # short prompts: unified measured 1.0-1.34x the prefill kernel


def use_unified_prefill(max_seqlen_q: int, total_q: int, num_seqs: int, group: int) -> bool:
    """True when the unified kernel serves this prefill: few rows, short prompts, or a batch
    whose tokens are far fewer than ``B * max_seqlen_q`` (a mix of decode rows and chunks)."""
    if max_seqlen_q * group <= _UNIFIED_MAX_ROWS or max_seqlen_q <= _UNIFIED_MAX_Q:
        return True
    return 2 * total_q < num_seqs * max_seqlen_q


# The Gluon Hopper prefill (hopper_prefill_kernel.py) serves fp16/bf16 prompts on sm90 (D 64 / 128)
# over dense K/V or a paged cache of 16-row-multiple pages, with sinks and the lse (no window,
# softcap or FP8), guarded by its own output check and the FA2-style kernel's fixup launch so
# that a non-finite value row still reaches only the rows that see it
# (hopper_prefill_launch.prefill_guarded). H200,
# bf16 32/8 heads, TFLOP/s vs this backend's kernels: causal 4 x 4096 529-535 vs 410, 1 x 16384 603
# vs 477, 16 x 1024 377-380 vs 257, 64 x 256 230 (one consumer warpgroup per program; 162 with two)
# vs 101-128, non-causal 4 x 4096 604-608 vs 467; paged prefix (pages of 16), 4 x 1024 over 3072
# cached keys 558 vs 358 (FA2-style), 1 x 4096 over 12288 590 vs 406; the guard (output check +
# fixup launch) costs 0.1-1.5% of the kernel's time, where the V scan it replaced cost 13-19%
# (BENCHMARKS.md, fourth and fifth passes). False: never route there.
HOPPER_PREFILL = True
# Host time per eager call on the H200 host (2026-11-30, prompts of 2 x 256): the guarded Hopper
# route bound to its signature 36 us (a memset and two compiled launches:
# hopper_prefill_launch.bind_prefill_guarded; 133 through JITFunction.run), a bound unified or
# FA2-style prefill 11-17. Eager calls back to back, wall time per call (host + GPU), Hopper
# route vs unified (bf16, 32/8 heads, D 128): 2 x 256 (Tq * Sk * H * D = 2^29) 35.5 vs 17.1 us,
# 16 x 256 (2^32) 61.8 vs 79.1, 4 x 1024 (2^34) 96.7 vs 145.4, 64 x 256 (2^34) 195.6 vs
# 292.6. So an eager call below 2^32 (causal FLOPs below 2^33), where the Hopper route's host
# time is about its kernel's, takes the other route's bound kernel. A call being captured into
# a CUDA graph (no host time per replay) always takes the Hopper one.
_HOPPER_EAGER_MIN_WORK = 1 << 32
# torch.cuda.is_current_stream_capturing without its Python frame (read once per signature)
_capturing = (torch._C._cuda_isCurrentStreamCapturing if torch.backends.cuda.is_built()
              else torch.cuda.is_current_stream_capturing)


def prefill_route(q, k, cu_seqlens_q, max_seqlen_q, causal=True, block_table=None,
                  window_left=-1, softcap=0.0, sinks=None, k_scale=None,
                  return_lse=False, max_seqlen_k=None) -> str:
    """Which kernel serves a prefill, from host-known metadata only (no sync; CUDA-graph safe):
    "unified" (few rows per sequence, or a batch far shorter than ``B * max_seqlen_q``),
    "hopper" (the guarded Gluon kernel, where it serves the call: past the few-row bound, or
    within it in its packed form where that takes the call), "split" (where it serves a
    batch far shorter than ``B * max_seqlen_q`` whose keys reach past its queries, or
    ``max_seqlen_k`` not given: the unified kernel's small path takes the sequences of at most
    ``_SPLIT_ROWS`` packed rows, the Gluon kernel the others), else
    "prefill" (FA2-style). Also read by the compiled path (graph_passes/lowering), which leaves
    "hopper" and "split" calls to the op: Inductor cannot launch a Gluon kernel inline."""
    num_kv_heads = k.shape[2] if block_table is not None else k.shape[1]
    max_q, total_q, num_seqs = int(max_seqlen_q), q.shape[0], cu_seqlens_q.shape[0] - 1
    group = q.shape[1] // max(num_kv_heads, 1)
    few_rows = max_q * group <= _UNIFIED_MAX_ROWS
    # A batch far shorter than B * max_seqlen_q holds short sequences (decode or speculative
    # rows beside chunks; prompts of mixed lengths): the Gluon kernel's tiles are per sequence
    # and head, so it leaves those few-row sequences to the unified kernel's GQA-packed small
    # path (the split route). H200, bf16 32/8 heads, one call: 48 decode rows + 8 x 4
    # speculative rows + 2 chunks of 512 over 4k paged prefixes 427.8 us vs 573.5 on the
    # unified kernel alone (1.33x vs 1.76x the parts' roofline); 96 prompts of U(1, 400)
    # 0.351 ms vs 0.394 (BENCHMARKS.md, fifth pass).
    padded = 4 * total_q < 3 * num_seqs * max_q
    # Only where some keys lie before the queries (a cache: decode rows read long prefixes, which
    # the Gluon kernel would read once per head) does the split pay. Prompts of mixed lengths
    # with no prefix run faster on the Gluon kernel alone, the few prompts of at most 4 tokens
    # as cheap items among the others (H200 graph replays, bf16 32/8 heads: 96 x U(1, 400) 274.5
    # us vs 382.1 split; 64 x U(1, 100) 69.0 vs 87.4; with prefixes the split still wins: 48
    # decode + 8 x 4 + 2 x 512 over 4k 359.9 vs 1011.8, 16 decode + 4 x 1024 over 1k 285.4 vs
    # 438.7; BENCHMARKS.md, ninth pass).
    split = padded and (max_seqlen_k is None or int(max_seqlen_k) > max_q)
    if HOPPER_PREFILL and q.device.type == "cuda":
        from attn_ops.backends.triton import hopper_prefill_launch as hopper
        paged = block_table is not None
        if hopper.available(q.device) and hopper.supports(
                q.dtype, q.shape[2], bool(causal), k.shape[1] if paged else 0, window_left,
                softcap, sinks is not None, k_scale is not None, return_lse) is None and (
                not paged or hopper.cache_reason(k, k) is None):
            if not few_rows:
                return "split" if split else "hopper"
            # Few rows per sequence (past 16) with about an item per SM: the Gluon kernel's
            # packed form (the query heads of a KV head in one item; hopper_prefill_forms.packing).
            # H200, pages of 16, graph replays, 8 queries at B 16 x 2048: 1.13x the one-token
            # decode against the unified kernel's 1.22x (BENCHMARKS.md, fourteenth pass).
            from attn_ops.backends.triton.common import device_sm_count
            if hopper.packing(q.shape[1], num_kv_heads, max_q, num_seqs,
                              device_sm_count(q.device)) > 1:
                return "hopper"
    return "unified" if use_unified_prefill(max_q, total_q, num_seqs, group) else "prefill"


# The split route's share of the unified kernel: sequences of at most 16 packed rows (4 queries at
# G = 4: decode and speculative rows), one small-path tile each, the tile the few-query
# measurements were made with (BENCHMARKS.md, "few queries": 1.02-1.04x the one-token decode).
_SPLIT_ROWS = 16


def _split_config(q):
    """The unified kernel's small path alone, for ``_SPLIT_ROWS`` rows (unified_plan.Config)."""
    from attn_ops.backends.triton import unified_plan
    return unified_plan.launch_config(_SPLIT_ROWS, q.shape[2], q.dtype)


def _split_min_q(q, k, block_table) -> int:
    """The most queries of a sequence the split route leaves to the unified kernel."""
    num_kv_heads = k.shape[2] if block_table is not None else k.shape[1]
    return _SPLIT_ROWS // (q.shape[1] // num_kv_heads)


def prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal=True,
            block_table=None, window_left=-1, softcap=0.0, sinks=None, k_scale=None,
            v_scale=None, return_lse=False):
    """attn::prefill (``return_lse``: prefill_with_lse, ``(out, lse)``) on the kernel that
    serves the call's shapes (:func:`prefill_route`)."""
    route = prefill_route(q, k, cu_seqlens_q, max_seqlen_q, causal, block_table, window_left,
                          softcap, sinks, k_scale, return_lse, max_seqlen_k)
    if route in ("hopper", "split"):
        from attn_ops.backends.triton import hopper_prefill_launch
        out, lse, min_q = None, None, 0
        if route == "split":
            from attn_ops.backends.triton import unified_kernel
            out = unified_kernel.prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                         max_seqlen_k, scale, causal, block_table, sinks=sinks,
                                         return_lse=return_lse, config=_split_config(q))
            if return_lse:
                out, lse = out
            min_q = _split_min_q(q, k, block_table)
        return hopper_prefill_launch.prefill_guarded(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                     max_seqlen_q, max_seqlen_k, scale, causal,
                                                     block_table, out, min_q, sinks=sinks,
                                                     return_lse=return_lse, lse=lse)
    if route == "unified":
        from attn_ops.backends.triton import unified_kernel as kernel
    else:
        from attn_ops.backends.triton import prefill_kernel as kernel
    return kernel.prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                          causal, block_table, window_left, softcap, sinks, k_scale, v_scale,
                          return_lse)


def merge_states(out_a, lse_a, out_b, lse_b):
    from attn_ops.backends.triton import merge_kernel
    return merge_kernel.merge_states(out_a, lse_a, out_b, lse_b)


def decode(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left=-1, softcap=0.0,
           sinks=None, k_scale=None, v_scale=None, return_lse=False):
    """attn::decode (``return_lse``: decode_with_lse, ``(out, lse)``) on the split-KV kernel."""
    from attn_ops.backends.triton import decode_kernel
    return decode_kernel.decode(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left,
                                softcap, sinks, k_scale, v_scale, return_lse)


def bind(config):
    """The op function for ``config`` (an ``OpConfig``), bound to one call signature.

    The registry's dispatch memo calls ``bind`` once per call signature (shapes, strides,
    dtypes, devices, scalars, which optional tensors are given), so the function returned here
    sees one signature only. Its first call plans the call from its arguments: the kernel
    (unified or prefill kernel), split count, grids, constexprs, every stride and scalar kernel
    argument, the prepared launches (``bind_*`` of the kernel modules, :func:`launch.prepare`).
    Every later call allocates the outputs and launches: on CUDA straight through the compiled
    launchers (the 14 us of wrapper Python per decode call measured on the development CPU
    become ~3). Calls on tensor subclasses or under a dispatch mode (tracing) run the plain
    function.
    """
    plain = globals()[config.op]
    if config.op == "merge_states":
        if config.device.type != "cuda":
            return plain
        from attn_ops.backends.triton import launch  # imports torch only, not triton
        return launch.bind_signature(plain)
    from attn_ops.backends.triton import launch
    builder = globals()["_bind_" + config.op]
    stats, tensor, depth = launch.stats, torch.Tensor, torch._C._len_torch_dispatch_stack
    fast = None
    counts = 1  # 0 where the planned function counts its calls itself (routes_traced)

    def bound(*args, **kwargs):
        nonlocal fast, counts
        if fast is not None and type(args[0]) is tensor and not depth():
            stats["bound"] += counts
            return fast(*args, **kwargs)
        if type(args[0]) is not tensor or depth():
            return plain(*args, **kwargs)  # traced or a subclass: the wrapper decides
        fast = builder(*args, **kwargs)
        counts = 0 if getattr(fast, "routes_traced", False) else 1
        stats["bound"] += counts
        return fast(*args, **kwargs)
    return bound


def bind_args(config, args: tuple):
    """The op function of one call signature, planned from its first call's ``args`` (the op's
    positional arguments, all of them) and called like it: the registry's dispatch memo keeps
    it (``registry.bind_args``) and calls it without building a keyword dict. As :func:`bind`,
    but the plan is made when the memo decides, so the memo holds the planned function itself
    where it routes traced and subclass calls to the plain wrapper on its own (the bound
    decode and prefill functions: ``routes_traced``), two Python frames and a ``**kwargs``
    fewer per call than :func:`bind`'s (~0.6 us on the development CPU). Elsewhere (the store,
    a call with nothing to launch, a traced first call) a thin function does that routing.
    """
    from attn_ops.backends.triton import launch
    op = config.op
    if op == "merge_states":
        return bind(config)
    plain, builder = globals()[op], globals()["_bind_" + op]
    lse = () if op == "store_kvcache" else (config.with_lse,)  # the wrappers' return_lse
    stats, tensor, depth = launch.stats, torch.Tensor, torch._C._len_torch_dispatch_stack
    fast = builder(*args, *lse) if type(args[0]) is tensor and not depth() else None
    if getattr(fast, "routes_traced", False):
        return fast

    def bound(*args):
        nonlocal fast
        if type(args[0]) is tensor and not depth():
            if fast is None:
                fast = builder(*args, *lse)
            stats["bound"] += 1
            return fast(*args, *lse)
        return plain(*args, *lse)  # traced or a subclass: the wrapper decides
    return bound


def _bind_store_kvcache(*args, **kwargs):
    from attn_ops.backends.triton import store_kernel
    return store_kernel.bind_store_kvcache(*args, **kwargs)


def _bind_decode(*args, **kwargs):
    from attn_ops.backends.triton import decode_kernel
    return decode_kernel.bind_decode(*args, **kwargs)


def _bind_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, *args, **kwargs):
    # args: max_seqlen_k, scale, causal, block_table, window_left, softcap, sinks, k_scale,
    # v_scale, return_lse (prefill's order)
    names = ("max_seqlen_k", "scale", "causal", "block_table", "window_left", "softcap",
             "sinks", "k_scale", "v_scale", "return_lse")
    given = dict(zip(names, args), **kwargs)
    route = prefill_route(q, k, cu_seqlens_q, max_seqlen_q, given.get("causal", True),
                          given.get("block_table"), given.get("window_left", -1),
                          given.get("softcap", 0.0), given.get("sinks"), given.get("k_scale"),
                          given.get("return_lse", False), given.get("max_seqlen_k"))
    if route in ("hopper", "split"):  # decided and planned once per signature
        from attn_ops.backends.triton.hopper_prefill_launch import bind_prefill_guarded
        from attn_ops.backends.triton.unified_launch import bind_prefill as bind_unified
        table = given.get("block_table")
        # Half the causal FLOPs of a full batch (4 * Tq * Sk / 2 * H * D); see
        # _HOPPER_EAGER_MIN_WORK.
        work = q.shape[0] * int(given.get("max_seqlen_k", max_seqlen_q)) * q.shape[1] * q.shape[2]
        eager = None
        if work < _HOPPER_EAGER_MIN_WORK:
            group = q.shape[1] // (k.shape[2] if table is not None else k.shape[1])
            if use_unified_prefill(int(max_seqlen_q), q.shape[0], cu_seqlens_q.shape[0] - 1,
                                   group):
                bind_other = bind_unified
            else:
                from attn_ops.backends.triton.prefill_kernel import bind_prefill as bind_other
            eager = bind_other(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, *args, **kwargs)
        small, min_q = None, 0
        if route == "split":
            small = bind_unified(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, *args,
                                 config=_split_config(q), **kwargs)
            min_q = _split_min_q(q, k, table)
        sinks, with_lse = given.get("sinks"), bool(given.get("return_lse", False))
        guarded = bind_prefill_guarded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       given["max_seqlen_k"], given["scale"],
                                       given.get("causal", True), table, min_q, sinks=sinks,
                                       return_lse=with_lse)

        if eager is None and small is None and getattr(guarded, "routes_traced", False):
            # Large calls: the bound guarded entry itself, which takes the op's arguments and
            # sends traced calls, and those it cannot serve directly, to prefill_guarded as the
            # wrapper would: a Python frame less per call.
            return guarded
        tensor, depth, capturing = torch.Tensor, torch._C._len_torch_dispatch_stack, _capturing

        def hopper(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                   causal=True, block_table=None, window_left=-1, softcap=0.0, sinks=None,
                   k_scale=None, v_scale=None, return_lse=False):
            args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                    causal, block_table, window_left, softcap, sinks, k_scale, v_scale,
                    return_lse)
            if type(q) is not tensor or depth():  # traced or a subclass: the wrapper decides
                return prefill(*args)
            if eager is not None and not capturing():
                return eager(*args)
            out = lse = None
            if small is not None:  # the split route: the unified kernel's rows first
                out = small(*args)
                if with_lse:
                    out, lse = out
            return guarded(*args[:10], sinks=sinks, out=out, lse=lse)
        # The functions it calls count their calls (launch.stats["bound"]) themselves.
        hopper.routes_traced = True  # the dispatch memo may call it directly (bind_args)
        return hopper
    if route == "unified":
        from attn_ops.backends.triton.unified_launch import bind_prefill
    else:
        from attn_ops.backends.triton.prefill_kernel import bind_prefill
    return bind_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, *args, **kwargs)
