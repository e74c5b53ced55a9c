"""Host side of the Gluon Hopper prefill (hopper_prefill_kernel.py): what it serves, where it
runs, and the launch (TMA descriptors over the packed rows, the grid from static bounds).

Public surface: :func:`available`, :func:`supports`, :func:`prefill`.
"""

from __future__ import annotations

import functools

from attn_ops.backends.triton.hopper_prefill_kernel import GLUON

if GLUON:
    from triton.experimental.gluon import language as gl

    from attn_ops.backends.triton.hopper_prefill_kernel import hopper_prefill_kernel

LOG2E = 1.4426950408889634
BLOCK_M = 64  # rows per consumer warpgroup (wgmma's M); a program owns 2 * BLOCK_M rows
# BLOCK_N, STAGES per head dim. Shared memory at D=128: Q 32 KB + (K + V) 64 KB per stage.
_CONFIGS = {64: (128, 3), 128: (128, 2)}
# Registers per thread: 4 + 4 + 1 warps round to 12 (3 warpgroups), capped at 168 (168 * 384 <=
# 64 K). Triton 3.6 gives the default partition 256, so the workers share 248 (256 + 248 = 3 *
# 168: more and the consumer's setmaxnreg.inc would wait for registers that never free). The
# persistent producer walks the item list itself: at 24 registers it spilled 24 bytes, at 32 none,
# and the consumer worker still fits in 216 (208 spills 92 bytes; ptxas for sm_90a, off the GPU).
MAXNREG, CONSUMER_REGS, PRODUCER_REGS = 168, 216, 32


def available(device=None) -> bool:
    """Gluon's Hopper API importable, and ``device`` (default: the current CUDA device) is an
    sm90 GPU."""
    if not GLUON:
        return False
    import torch
    if not torch.cuda.is_available():
        return False
    dev = torch.device("cuda") if device is None else torch.device(device)
    if dev.type != "cuda":
        return False
    return _is_sm90(dev.index if dev.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _is_sm90(index: int) -> bool:
    """Device ``index`` is an sm90 NVIDIA GPU (read once: the route asks on every call)."""
    import torch
    return torch.cuda.get_device_capability(index) == (9, 0) and torch.version.hip is None


def supports(q_dtype, head_dim: int, causal: bool = True, paged: bool = False,
             window_left: int = -1, softcap: float = 0.0, sinks: bool = False,
             fp8: bool = False, return_lse: bool = False) -> str | None:
    """None when this kernel can serve the call, else the reason (static facts only)."""
    import torch
    if q_dtype not in (torch.float16, torch.bfloat16):
        return f"hopper prefill: q dtype {q_dtype} (serves float16 / bfloat16)"
    if head_dim not in _CONFIGS:
        return f"hopper prefill: head_dim {head_dim} (serves {sorted(_CONFIGS)})"
    for flag, what in ((paged, "a paged KV cache (block_table)"),
                       (window_left >= 0, "a sliding window"), (softcap > 0, "softcap"),
                       (sinks, "sinks"), (fp8, "fp8 caches"), (return_lse, "the LSE output")):
        if flag:
            return f"hopper prefill: {what} is not supported"
    return None


def _tma_ready(x):
    """``x`` as a [T, heads * D] row matrix TMA can read: packed heads, 16-byte rows and base
    (a copy otherwise)."""
    t, h, d = x.shape
    if (x.stride(2) != 1 or x.stride(1) != d or (x.stride(0) * x.element_size()) % 16
            or x.data_ptr() % 16):
        x = x.contiguous()
    return x.as_strided((t, h * d), (x.stride(0), 1))


def prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
            scale: float, causal: bool = True, out=None, flags=None):
    """q ``[Tq, H, D]``, k/v ``[Tk, Hkv, D]`` (float16 / bfloat16, D in 64 / 128, ``H % Hkv ==
    0``), cu_seqlens ``[B + 1]`` int32 on q's device. Returns ``[Tq, H, D]`` in q's dtype (or
    fills ``out``, contiguous ``[Tq, H, D]``). Causal masks are bottom-right aligned; a row that
    sees no key, and every row past ``cu_seqlens_q[-1]``, is zero. No host sync: the items come
    from ``max_seqlen_q`` and B, the persistent grid is one program per SM (at most).
    ``flags``: int32 ``[cdiv(max_seqlen_q, 128), B + 1, H, 2]`` (see :func:`flags_shape`),
    zeros: raised to 1 where a half tile's output is not finite (allocated here when None).

    Not isolating (see the kernel's docstring): :func:`prefill_guarded` is the contract's
    entry point."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from attn_ops.backends.triton.common import device_sm_count
    total_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    num_seqs = cu_seqlens_q.shape[0] - 1
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if total_q == 0:
        return out
    if k.shape[0] == 0 or num_seqs == 0:
        return out.zero_()  # no key anywhere (static shapes say so)
    block_n, stages = _CONFIGS[head_dim]
    dt = gl.float16 if q.dtype == torch.float16 else gl.bfloat16
    q_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, head_dim], dt)
    kv_layout = gl.NVMMASharedLayout.get_default_for([block_n, head_dim], dt)
    q2, k2, v2 = _tma_ready(q), _tma_ready(k), _tma_ready(v)
    q_desc = TensorDescriptor.from_tensor(q2, [BLOCK_M, head_dim], q_layout)
    k_desc = TensorDescriptor.from_tensor(k2, [block_n, head_dim], kv_layout)
    v_desc = TensorDescriptor.from_tensor(v2, [block_n, head_dim], kv_layout)
    shape = flags_shape(max_seqlen_q, num_seqs, num_heads)
    if flags is None:
        flags = torch.zeros(shape, dtype=torch.int32, device=q.device)
    items = shape[0] * shape[1] * shape[2]
    hopper_prefill_kernel[(min(items, device_sm_count(q.device)),)](
        q_desc, k_desc, v_desc, out, cu_seqlens_q, cu_seqlens_k, flags, out.stride(0),
        out.stride(1), cu_seqlens_q.stride(0), cu_seqlens_k.stride(0), total_q, num_seqs,
        num_heads, shape[0], float(scale) * LOG2E, GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=block_n, STAGES=stages, CAUSAL=bool(causal),
        CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, num_warps=4,
        maxnreg=MAXNREG)
    return out


def flags_shape(max_seqlen_q: int, num_seqs: int, num_heads: int) -> tuple[int, int, int, int]:
    """The kernel's items (tiles of 2 * BLOCK_M rows, B + 1, H) and the two halves of a tile:
    one int32 flag each."""
    return (max(1, -(-int(max_seqlen_q) // (2 * BLOCK_M))), num_seqs + 1, num_heads, 2)


def prefill_guarded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                    scale: float, causal: bool = True, out=None):
    """:func:`prefill` with the contract's rule for non-finite values: a NaN or +-Inf value
    row reaches only the query rows that see it. A memset and two launches, the same every call
    (no host sync, CUDA-graph safe): this kernel, which flags every half tile whose output is
    not finite (a leak shows there, see the kernel's docstring), then the isolating FA2-style
    kernel in its fixup mode, which rewrites the flagged halves and otherwise returns after one
    load per program. Same arguments and result as :func:`prefill`."""
    import torch
    from attn_ops.backends.triton import prefill_kernel
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0 or k.shape[0] == 0 or cu_seqlens_q.shape[0] == 1:
        return prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                       causal, out)  # nothing to launch
    shape = flags_shape(max_seqlen_q, cu_seqlens_q.shape[0] - 1, q.shape[1])
    flags = torch.zeros(shape, dtype=torch.int32, device=q.device)  # one memset
    prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
            out, flags)
    prefill_kernel.prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           scale, causal, out=out, fixup=(flags, shape[0], BLOCK_M))
    return out
