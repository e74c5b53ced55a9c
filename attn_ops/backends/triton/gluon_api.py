"""The Gluon builtins our Hopper kernels call whose names Triton changed after 3.6, under one
name for every Triton that has Gluon's Hopper API.

Triton 3.6 (the release torch 2.11 pins) names them ``gl.thread_barrier`` and
``tma.async_copy_global_to_shared``; Triton 3.9 (torch 2.13's) removed those for ``gl.barrier``
and ``tma.async_load``, the same operations (a CTA barrier that a warp-specialized partition
lowers to its own named barrier; a TMA tile copy into shared memory completing an mbarrier).
Without these aliases every Gluon kernel here fails to compile under Triton 3.9, while the
Triton backend still routes to it on an sm90 GPU. Triton 3.6 has neither new name, so there the
kernels measured on the H200 compile exactly as before (3.9 keeps ``async_copy_global_to_shared``
as a stub that raises: the new name is looked for first). Checked by compiling both kernels for
sm_90a under Triton 3.9 without a GPU (tests/attn_ops/backends/triton/test_gluon_api.py).

Imported only where Gluon imported (the kernel modules' guarded imports).
"""

from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma

thread_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
