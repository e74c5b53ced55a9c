"""How the Gluon Hopper kernels' host side (hopper_prefill_launch.py, hopper_decode_launch.py)
describes tensors to TMA: a tile's shared-memory layout, q / k / v and paged caches as the row
matrices TMA reads, and descriptors made from fields a call signature has pinned.

Imported only where Gluon's Hopper API is importable (the launch modules' guarded paths).
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def shared_layout(rows: int, head_dim: int, fp16: bool):
    """The NVMMA shared-memory layout of a ``[rows, head_dim]`` tile of fp16 (else bf16)
    elements (~6 us to build, so once per shape)."""
    from triton.experimental.gluon import language as gl
    return gl.NVMMASharedLayout.get_default_for([rows, head_dim],
                                                gl.float16 if fp16 else gl.bfloat16)


def heads_packed(x) -> bool:
    """``x`` ``[T, heads, D]`` has its heads packed (``[T, heads * D]`` is a row matrix) and
    16-byte rows."""
    return (x.stride(2) == 1 and x.stride(1) == x.shape[2]
            and (x.stride(0) * x.element_size()) % 16 == 0)


def row_matrix(x) -> tuple[list, list]:
    """The shape and strides of ``x`` as the row matrix TMA reads: ``[T, heads * D]`` for
    ``[T, heads, D]``, or ``[blocks * page, heads * D]`` for a paged cache ``[blocks, page,
    heads, D]`` of packed pages (hopper_prefill_launch.cache_reason)."""
    if x.dim() == 4:
        return [x.shape[0] * x.shape[1], x.shape[2] * x.shape[3]], [x.stride(1), 1]
    return [x.shape[0], x.shape[1] * x.shape[2]], [x.stride(0), 1]


def tma_rows(x) -> tuple:
    """``x`` as TMA reads it: (base tensor, *:func:`row_matrix`); a ``[T, heads, D]`` whose
    heads are not packed, or whose base is not 16-byte aligned, is copied first."""
    if x.dim() == 3 and (not heads_packed(x) or x.data_ptr() % 16):
        x = x.contiguous()
    return (x, *row_matrix(x))


def descriptor_maker(cls, shape, strides, block_shape, layout):
    """``make(base)``: a ``cls`` (Gluon's TensorDescriptor) over ``base`` with these fields,
    set directly (0.4 us against 1.8 for the validating constructor, development CPU): for a
    base whose dtype, shape and strides the caller has already checked."""
    new, fields = cls.__new__, dict(shape=shape, strides=strides, block_shape=block_shape,
                                    layout=layout, padding="zero")

    def make(base):
        d = new(cls)
        d.__dict__.update(fields, base=base)
        return d
    return make
