"""What the producer warp of the Gluon Hopper prefill (hopper_prefill_kernel.py) loads by TMA
besides dense K/V tiles: an item's Q (one tile per consumer, or the packed form's query heads
one after another) and the page pieces of a paged cache's K/V tiles. Imported only by the
kernel's module, inside its guard for a Triton without Gluon.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from attn_ops.backends.triton.gluon_api import tma_load


@gluon.jit
def load_q(q_desc, q_bufs, q_bar, q_row, head, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
           CONSUMERS: gl.constexpr, PACK: gl.constexpr):
    """An item's Q into ``q_bufs``, completing ``q_bar``: ``CONSUMERS`` tiles of ``BLOCK_M``
    rows of head ``head`` from row ``q_row``; packed (``PACK`` > 1, one consumer: the
    descriptor's boxes are ``BLOCK_M // PACK`` rows) the same rows of heads ``head .. head +
    PACK - 1``, one box each, one after another in the tile (head-major rows)."""
    mbarrier.expect(q_bar, CONSUMERS * PACK * q_desc.block_type.nbytes)
    if PACK == 1:
        for c in gl.static_range(CONSUMERS):
            tma_load(q_desc, [q_row + c * BLOCK_M, head * HEAD_DIM], q_bar, q_bufs.index(c))
    else:
        TOK: gl.constexpr = BLOCK_M // PACK
        for p in gl.static_range(PACK):
            tma_load(q_desc, [q_row, (head + p) * HEAD_DIM], q_bar,
                     q_bufs.index(0).slice(p * TOK, TOK))


@gluon.jit
def page_rows(table_row, stride_tc, table_width, key0, lk, PAGE: gl.constexpr,
              PAGE_ROWS: gl.constexpr, PIECES: gl.constexpr):
    """The cache rows (``block * PAGE + offset``) of the ``PIECES`` page pieces of
    ``PAGE_ROWS`` keys from key ``key0`` on, one vector load of the block table (its row
    ``table_row``); ``-PAGE_ROWS`` for a piece past the sequence's ``lk`` keys, whose table
    entry may be anything: a box wholly out of bounds, which TMA fills with zeros."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    keys = key0 + gl.arange(0, PIECES, layout=layout) * PAGE_ROWS
    blocks = gl.load(table_row + gl.minimum(keys // PAGE, table_width - 1) * stride_tc)
    return gl.where(keys < lk, blocks * PAGE + keys % PAGE, -PAGE_ROWS)


@gluon.jit
def _piece(rows, p: gl.constexpr, PIECES: gl.constexpr):
    """Element ``p`` of ``rows`` as a scalar (a warp reduction: TMA takes scalars)."""
    idx = gl.arange(0, PIECES, layout=rows.type.layout)
    return gl.sum(gl.where(idx == p, rows, 0), axis=0)


@gluon.jit
def copy_pieces(desc, rows, kv_col, empty, ready, buf, ph, PAGE_ROWS: gl.constexpr,
                PIECES: gl.constexpr):
    """Once ``empty`` is past phase ``ph``: the page pieces at cache ``rows`` (see
    :func:`page_rows`) into row slices of ``buf``, completing ``ready``."""
    mbarrier.wait(empty, ph ^ 1)
    mbarrier.expect(ready, PIECES * desc.block_type.nbytes)
    for p in gl.static_range(PIECES):
        tma_load(desc, [_piece(rows, p, PIECES), kv_col], ready,
                 buf.slice(p * PAGE_ROWS, PAGE_ROWS))
