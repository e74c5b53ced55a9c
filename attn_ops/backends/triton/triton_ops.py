"""The Triton prefill and decode as ``torch.library.triton_op``: kernels Inductor can launch.

``torch.ops.attn.prefill`` / ``decode`` are opaque to Inductor (one extern call each, which runs
the op path in Python at every call: the registry memo, then the kernel wrapper and its
launch). When a graph's backend is known to be Triton at trace time, the compiled path swaps
them for ``torch.ops.attn_triton.prefill`` / ``decode`` defined here (graph_passes/lowering).
A ``triton_op`` is traced into by AOTAutograd: its kernel launches become
``triton_kernel_wrapper_functional`` nodes, and Inductor emits and launches the kernels from its
generated code (Python wrapper or AOTInductor's C++), with no Python of ours per call.

Same arguments and semantics as the attn ops (up to ``softcap``; the passes substitute only
calls without sinks, FP8 scales or LSE, which the Triton kernels do not serve). No checks run
here: the attn op's fake kernel checked the metadata when the graph was traced, and the data
checks (``ATTN_OPS_CHECK=1``) would need a host sync, so the passes leave calls alone while
they are on. Registering imports triton: the passes import this module only when they use it.

A kernel launched from here must not run non-pure inline asm: Inductor first reads the kernel's
TTIR to learn what it writes, and that analysis stops at such an op. With the decode's PDL wait
in the kernel the compiled graph's output was wrong on the H200, so traced launches are plain
ones (launch.launch).
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from attn_ops.backends.triton import decode_kernel, prefill_kernel


@triton_op("attn_triton::prefill", mutates_args=())
def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
            causal: bool = True, block_table: torch.Tensor | None = None,
            window_left: int = -1, softcap: float = 0.0) -> torch.Tensor:
    """``attn::prefill`` (q ``[Tq, H, D]`` -> ``[Tq, H, D]``) on the kernel the Triton backend's
    route picks from the traced metadata: the unified kernel (few queries per sequence, and
    batches far shorter than ``B * max_seqlen_q``; a few-query paged batch may take its balanced
    kernel) or the FA2-style one. The passes leave the Gluon routes ("hopper", "split") as
    extern calls, so they never reach here; were one to, the FA2-style kernel serves it."""
    from attn_ops.backends import triton as backend
    from attn_ops.backends.triton import unified_kernel
    route = backend.prefill_route(q, k, cu_seqlens_q, max_seqlen_q, causal, block_table,
                                  window_left, softcap)
    kernel = unified_kernel if route == "unified" else prefill_kernel
    return kernel.prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          scale, causal, block_table, window_left, softcap)


@triton_op("attn_triton::decode", mutates_args=())
def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           seqlens_k: torch.Tensor, block_table: torch.Tensor, scale: float,
           window_left: int = -1, softcap: float = 0.0) -> torch.Tensor:
    """``attn::decode`` (q ``[B, H, D]`` -> ``[B, H, D]``) on the Triton split-KV kernel."""
    return decode_kernel.decode(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left,
                                softcap)


# attn op -> (its Triton counterpart, how many leading arguments the counterpart takes)
COUNTERPARTS = {
    "prefill": (torch.ops.attn_triton.prefill.default, 12),
    "decode": (torch.ops.attn_triton.decode.default, 8),
}
