"""Are all value rows finite? A device-side flag that picks between two prefill kernels.

The Hopper prefill (hopper_prefill_kernel.py) keeps a value row that a query row must not see
(the causal future on the diagonal tile, the next sequence's rows in a last partial tile) out of
that row's softmax weights but not out of ``P @ V``: ``0 * NaN`` is NaN. The contract says a
non-finite value reaches only the rows that see it. Rather than isolate inside the Hopper kernel,
a call first scans V here: :func:`nonfinite_parts` writes one int32 per program of a fixed grid
(1 where its stripe of V holds a NaN or +-Inf); the Hopper kernel runs only when every part is
0, and the FA2-style prefill kernel (which isolates) only when one is not. Both are launched, one
returns at once: no host sync, CUDA-graph safe, the same launches every call.

Cost: one read of V (bf16 4 x 4096 x 8 heads x 128: 33.5 MB, ~10 us at 3.3 TB/s, ~1% of that
prefill) plus the launch of the kernel that returns at once.

Imported only by the kernel modules (it imports triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn_ops.backends.triton.common import INTERPRET, device_sm_count, next_pow2
from attn_ops.backends.triton.launch import launch

# Rows of [Tk * Hkv, D] per program step; programs per SM of the fixed grid.
_BLOCK_ROWS = 64
_PROGRAMS_PER_SM = 2


@triton.jit
def _nonfinite_parts_kernel(V, PARTS, rows, num_kv_heads, stride_vt, stride_vh,
                            HEAD_DIM: tl.constexpr, D_P2: tl.constexpr,
                            BLOCK_ROWS: tl.constexpr):
    """Program p sums value rows ``p * BLOCK_ROWS + i * num_programs * BLOCK_ROWS + r`` (a row
    is one (token, kv head)) and writes 1 to ``PARTS[p]`` when a sum is non-finite, else 0. An
    fp32 sum that overflows on finite values also reads as non-finite: a false alarm only (the
    isolating kernel runs, exact either way)."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_ROWS
    offs_r = tl.arange(0, BLOCK_ROWS)
    offs_d = tl.arange(0, D_P2)
    dim_ok = offs_d < HEAD_DIM
    total = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for r0 in range(pid * BLOCK_ROWS, rows, step):
        r = r0 + offs_r
        ok = r < rows
        t = (r // num_kv_heads).to(tl.int64)
        h = r % num_kv_heads
        v = tl.load(V + (t * stride_vt + h * stride_vh)[:, None] + offs_d[None, :],
                    mask=ok[:, None] & dim_ok[None, :], other=0.0)
        total += tl.sum(v.to(tl.float32), 1)
    bad = tl.sum(((total - total) != 0.0).to(tl.int32), 0)  # NaN - NaN and inf - inf are NaN
    tl.store(PARTS + pid, tl.minimum(bad, 1))


def parts_count(device: torch.device) -> int:
    """Programs of the scan's fixed grid on ``device`` (the length of its parts vector)."""
    return 4 if INTERPRET or device.type != "cuda" else _PROGRAMS_PER_SM * device_sm_count(device)


def nonfinite_parts(v: torch.Tensor, parts: torch.Tensor | None = None) -> torch.Tensor:
    """v ``[Tk, Hkv, D]`` (any strides, contiguous last dim) -> int32 ``[parts_count]``: 1 in
    each part whose stripe of v holds a NaN or +-Inf, else 0. Every element is written."""
    tk, hkv, d = v.shape
    n = parts_count(v.device)
    if parts is None:
        parts = torch.empty(n, dtype=torch.int32, device=v.device)
    launch(_nonfinite_parts_kernel, (n,), v, parts, tk * hkv, hkv, v.stride(0), v.stride(1),
           HEAD_DIM=d, D_P2=max(16, next_pow2(d)), BLOCK_ROWS=_BLOCK_ROWS, num_warps=4)
    return parts
