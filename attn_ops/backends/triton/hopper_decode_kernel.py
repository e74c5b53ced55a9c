"""Hopper (sm90) one-token decode in Gluon: one program per (sequence, KV head), its K/V tiles
copied by a producer warp into a TMA ring, the GQA group's rows on wgmma.

Why a second decode kernel: the Triton decode kernels (decode_kernel.py,
decode_balanced_kernel.py) move K/V through the load/store unit, each thread computing its rows'
addresses, and ncu finds them waiting on those loads (L1TEX scoreboard stalls 47% of the cycles
at B 16 x 2048; BENCHMARKS.md, fourth pass). Here one producer warp copies whole page pieces
into a shared-memory ring by TMA, so the consumer warpgroup issues no load for K/V, and the
bytes in flight per SM are the ring's (two programs per SM at two 32 KB stages each).

Program ``(g, b)`` (grid ``(Hkv, B)``) reads all of sequence b's keys for KV head g. Its GROUP
query heads are the first rows of one 64-row tile (wgmma's M; the rest are zeros), so each K/V
tile is read once for the group:

- producer warp: per tile, the block-table entries of its ``BLOCK_N / PAGE_ROWS`` page pieces
  (one vector load, issued a tile ahead; the first beside the sequence's length, not after it)
  and their TMA copies into ring slot ``i % STAGES`` once the consumer released it; a piece
  past the sequence's keys is a box wholly out of bounds, which TMA fills with zeros;
- consumer warpgroup: S = Q K^T (wgmma from shared memory), the online softmax in the exp2
  domain, O += P V (P from registers).

No split of a sequence's keys, so it suits batches of about one to two programs per SM whose
lengths are alike (a long sequence among short ones runs alone on its SMs): hopper_decode_launch
says why the Triton backend's plan does not take it yet.

Non-finite values: the only keys a row must not see are those past the sequence's length in
its last tile (garbage a cache may hold). Their scores become ``-inf`` and their value rows are
zeroed in shared memory before ``P V`` (``0 * NaN`` would leak otherwise), so a NaN / Inf value
row reaches a row only when the row sees it. A zero-length sequence gives zeros.
"""

from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                                   warpgroup_mma)
    from attn_ops.backends.triton.hopper_prefill_loads import copy_pieces
    GLUON = True
except Exception:  # noqa: BLE001 - an older Triton, or one whose Gluon API moved: no kernel
    GLUON = False

if GLUON:
    BLOCK_M = gl.constexpr(64)  # wgmma's rows per warpgroup: the GROUP query heads, then zeros

    @gluon.jit
    def _piece_rows(table_row, stride_tc, table_width, key0, lk, row0, rows_per_block,
                    PAGE: gl.constexpr, PAGE_ROWS: gl.constexpr, PIECES: gl.constexpr):
        """The TMA rows of the ``PIECES`` page pieces of ``PAGE_ROWS`` keys from key ``key0``
        on (``block * rows_per_block + row0 + offset``: see :func:`hopper_decode_kernel`), one
        vector load of the block table; ``-PAGE_ROWS`` (a box wholly out of bounds, which TMA
        fills with zeros) for a piece past the sequence's ``lk`` keys, whose entry may be
        anything."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        keys = key0 + gl.arange(0, PIECES, layout=layout) * PAGE_ROWS
        blocks = gl.load(table_row + gl.minimum(keys // PAGE, table_width - 1) * stride_tc)
        return gl.where(keys < lk, blocks * rows_per_block + row0 + keys % PAGE, -PAGE_ROWS)

    @gluon.jit
    def _producer(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, SEQLENS,
                  TABLE, stride_sl, stride_tb, stride_tc, table_width, rows_per_block,
                  rows_per_head, cols_per_head, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  PAGE: gl.constexpr, PAGE_ROWS: gl.constexpr):
        """One warp: the sequence's K / V tiles into the ring, each tile's table entries loaded
        a tile ahead (the first tile's beside the length: neither load waits for the other)."""
        PIECES: gl.constexpr = BLOCK_N // PAGE_ROWS
        kvh = gl.program_id(0)
        b = gl.program_id(1)
        lk = gl.load(SEQLENS + b * stride_sl)
        table_row = TABLE + b.to(gl.int64) * stride_tb
        row0 = kvh * rows_per_head
        col = kvh * cols_per_head
        rows = _piece_rows(table_row, stride_tc, table_width, 0, lk, row0, rows_per_block,
                           PAGE, PAGE_ROWS, PIECES)
        for i in range((lk + BLOCK_N - 1) // BLOCK_N):
            nxt = _piece_rows(table_row, stride_tc, table_width, (i + 1) * BLOCK_N, lk, row0,
                              rows_per_block, PAGE, PAGE_ROWS, PIECES)
            st = i % STAGES
            ph = (i // STAGES) & 1
            copy_pieces(k_desc, rows, col, k_empty.index(st), k_ready.index(st),
                        k_bufs.index(st), ph, PAGE_ROWS, PIECES)
            copy_pieces(v_desc, rows, col, v_empty.index(st), v_ready.index(st),
                        v_bufs.index(st), ph, PAGE_ROWS, PIECES)
            rows = nxt

    @gluon.jit
    def _zero_rows_from(slot, first, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Zero rows ``first ..`` of a ring slot ``[BLOCK_N, HEAD_DIM]`` (16-byte pieces)."""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8],
                                                [4, 1], [1, 0])
        x = slot.load(layout)
        r = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
        slot.store(gl.where(gl.expand_dims(r < first, 1), x, gl.zeros_like(x)))

    @gluon.jit
    def _consumer(Q, O, SEQLENS, q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty,
                  stride_qb, stride_qh, stride_ob, stride_oh, stride_sl, qk_scale,
                  GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr):
        """The warpgroup: the group's rows against the sequence's tiles, then the output."""
        kvh = gl.program_id(0)
        b = gl.program_id(1)
        lk = gl.load(SEQLENS + b * stride_sl)
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                     k_width=2)
        q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8],
                                                  [4, 1], [1, 0])

        # The group's query rows (zeros below them) into shared memory, as wgmma's A.
        rq = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_layout))
        dq = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, q_layout))
        q_ptrs = (Q + b.to(gl.int64) * stride_qb
                  + gl.expand_dims((kvh * GROUP + rq) * stride_qh, 1) + gl.expand_dims(dq, 0))
        q_smem.store(gl.load(q_ptrs, mask=gl.expand_dims(rq < GROUP, 1), other=0.0))
        fence_async_shared()

        row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
        offs_n = gl.expand_dims(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)), 0)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_l)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_l)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        for i in range((lk + BLOCK_N - 1) // BLOCK_N):
            st = i % STAGES
            ph = (i // STAGES) & 1
            keys = i * BLOCK_N
            mbarrier.wait(k_ready.index(st), ph)
            s = warpgroup_mma(q_smem, k_bufs.index(st).permute((1, 0)), zero_s, use_acc=False)
            mbarrier.arrive(k_empty.index(st), count=1)
            # Every tile holds a key of the sequence, so each row's maximum is finite (or NaN
            # from a NaN it sees); only the last may hold keys past it.
            last = keys + BLOCK_N > lk
            if last:
                s = gl.where((keys + offs_n) < lk, s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            mbarrier.wait(v_ready.index(st), ph)
            if last:  # value rows past the sequence (the module docstring)
                _zero_rows_from(v_bufs.index(st), lk - keys, BLOCK_N, HEAD_DIM)
                fence_async_shared()
            acc = warpgroup_mma(p_op, v_bufs.index(st), acc)
            mbarrier.arrive(v_empty.index(st), count=1)

        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        out = acc * gl.expand_dims(gl.where(l_o > 0.0, 1.0 / l_o, 0.0), 1)  # no key: zeros
        r = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        ptrs = (O + b.to(gl.int64) * stride_ob + gl.expand_dims((kvh * GROUP + r) * stride_oh, 1)
                + gl.expand_dims(d, 0))
        gl.store(ptrs, out.to(O.dtype.element_ty), mask=gl.expand_dims(r < GROUP, 1))

    @gluon.jit
    def hopper_decode_kernel(k_desc, v_desc, Q, O, SEQLENS, TABLE, stride_qb, stride_qh,
                             stride_ob, stride_oh, stride_sl, stride_tb, stride_tc, table_width,
                             rows_per_block, rows_per_head, cols_per_head, qk_scale,
                             GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                             BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PAGE: gl.constexpr,
                             PAGE_ROWS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        """Grid ``(Hkv, B)``. q ``[B, H, D]`` (``Q``, strides ``stride_qb``, ``stride_qh``; fp16
        / bf16), caches of q's dtype read through ``k_desc`` / ``v_desc``: a row matrix with
        boxes of ``PAGE_ROWS`` rows, where key ``j`` of a block, KV head ``g``, is row ``block *
        rows_per_block + g * rows_per_head + j`` at column ``g * cols_per_head`` (token-major
        pages: ``[blocks * PAGE, Hkv * D]``; heads-major: ``[blocks * Hkv * PAGE, D]``),
        ``SEQLENS`` int32 ``[B]``, ``TABLE`` int32 ``[B, table_width]``. ``qk_scale`` = scale *
        log2(e). Output ``O`` ``[B, H, D]`` in q's dtype (strides ``stride_ob``,
        ``stride_oh``)."""
        dtype: gl.constexpr = Q.dtype.element_ty
        q_smem = gl.allocate_shared_memory(
            dtype, [BLOCK_M, HEAD_DIM], gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM],
                                                                             dtype))
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(s), count=1)
            mbarrier.init(v_ready.index(s), count=1)
            mbarrier.init(k_empty.index(s), count=1)
            mbarrier.init(v_empty.index(s), count=1)
        # The argument lists spelled out (Triton 3.6: see hopper_prefill_kernel).
        gl.warp_specialize([
            (_consumer, (Q, O, SEQLENS, q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty,
                         v_empty, stride_qb, stride_qh, stride_ob, stride_oh, stride_sl,
                         qk_scale, GROUP, HEAD_DIM, BLOCK_N, STAGES)),
            (_producer, (k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty,
                         SEQLENS, TABLE, stride_sl, stride_tb, stride_tc, table_width,
                         rows_per_block, rows_per_head, cols_per_head, BLOCK_N, STAGES, PAGE,
                         PAGE_ROWS)),
        ], [1], [PRODUCER_REGS])
