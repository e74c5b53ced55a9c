"""Hopper (sm90) varlen prefill in Gluon: TMA ring, async wgmma, warp specialization.

One program owns 128 query rows of one sequence and one head (grid ``(cdiv(max_seqlen_q, 128),
B + 1, H)``, tiles taken last-first like prefill_kernel so the long causal tiles start early).
Inside it three partitions run at once:

- a producer warp issues TMA loads: the two 64-row Q tiles once, then K and V tiles of BLOCK_N
  keys into a STAGES-deep shared-memory ring (one ready and one empty mbarrier per stage and
  operand, so a K slot is refilled as soon as both consumers have read it, before V is done);
- two consumer warpgroups (the default partition and one worker), 64 query rows each, read the
  same K/V slots. Each overlaps the next tile's ``Q K^T`` and its softmax with the previous
  tile's ``P V`` (issue S_j, issue O += P_{j-1} V_{j-1}, wait for S_j, softmax, wait for O,
  rescale); the warp schedulers interleave the two warpgroups, so one's softmax runs against
  the other's MMAs.

P stays in registers as wgmma's A operand. Causal tiles past the diagonal are never loaded;
masks are applied only on tiles that need them (the diagonal and the sequence's last partial
tile). K/V come from the packed ``[Tk, Hkv * D]`` rows through 2-D TMA descriptors, so a tile's
tail can hold the next sequence's keys (or TMA's zero fill past Tk): their scores are ``-inf``.
Rows past ``cu_seqlens_q[-1]`` are zeroed by the extra ``b = B`` column of the grid; a query row
that sees no key gets zeros.

Non-finite values: a NaN/Inf value row that a query row must not see (hidden by causality on
the diagonal tile, or the next sequence's row in the last tile) still reaches that row through
``0 * NaN`` in ``P V``; such a row then holds a non-finite output. So each consumer warpgroup
checks its 64 output rows (those below lq) and raises its int32 flag ``FLAGS[g, b, h, half]``
(zeroed by the caller) to 1 when one is not finite (a leak, or a row that legitimately sees a
NaN/Inf): an atomic max from the threads of such rows only, so a clean tile issues none. The
backend's entry point, hopper_prefill_launch.prefill_guarded, then launches the isolating
FA2-style kernel in its fixup mode, which rewrites exactly the flagged halves and returns at
once when none is set.
A finite output row cannot hide a leak (NaN and Inf never turn finite through ``P V``), so with
finite outputs this kernel's result stands.

Needs Triton with Gluon's Hopper API (tested: 3.6); the host side (descriptors, grid, the
supports / available checks) is hopper_prefill_launch.py.
"""

from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                                   tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    GLUON = True
except Exception:  # noqa: BLE001 - an older Triton, or one whose Gluon API moved: no kernel
    GLUON = False

if GLUON:
    @gluon.jit
    def _zero_rows(O, row_lo, row_hi, head, stride_ot, stride_oh,
                   ROWS: gl.constexpr, HEAD_DIM: gl.constexpr, num_warps: gl.constexpr):
        """Zeros for rows ``row_lo .. min(row_lo + ROWS, row_hi) - 1`` of head ``head``."""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        r = row_lo + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
        d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
        ptrs = (O + gl.expand_dims(r.to(gl.int64) * stride_ot, 1) + head * stride_oh
                + gl.expand_dims(d, 0))
        mask = gl.expand_dims(r < row_hi, 1) & gl.expand_dims(d < HEAD_DIM, 0)
        zeros = gl.zeros([ROWS, HEAD_DIM], O.dtype.element_ty, layout)
        gl.store(ptrs, zeros, mask=mask)

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready,
                  k_empty, v_empty, q_row, q_col, k_row, kv_col, n_iter,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """One warp: Q once, then K_j / V_j into slot ``j % STAGES`` when both consumers have
        released it (empty barriers count two arrivals; a fresh barrier passes phase 1)."""
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_bar, q_bufs.index(0))
        tma.async_copy_global_to_shared(q_desc, [q_row + BLOCK_M, q_col], q_bar, q_bufs.index(1))
        for i in range(n_iter):
            st = i % STAGES
            ph = (i // STAGES) & 1
            row = k_row + i * BLOCK_N
            mbarrier.wait(k_empty.index(st), ph ^ 1)
            mbarrier.expect(k_ready.index(st), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [row, kv_col], k_ready.index(st),
                                            k_bufs.index(st))
            mbarrier.wait(v_empty.index(st), ph ^ 1)
            mbarrier.expect(v_ready.index(st), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [row, kv_col], v_ready.index(st),
                                            v_bufs.index(st))

    @gluon.jit
    def _softmax(s, m_i, l_i, n0, full_hi, lk, q_pos, offs_n, qk_scale,
                 BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
        """Online-softmax step (exp2 domain, ``m`` kept scaled) over raw scores ``s`` of keys
        ``n0 ..``; masks only when the tile has a key some row must not see."""
        if n0 + BLOCK_N > full_hi:
            ok = (n0 + offs_n) < lk
            if CAUSAL:
                ok = ok & ((n0 + offs_n) <= q_pos)
            s = gl.where(ok, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
        alpha = gl.exp2(m_i - m_use)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _consumer(q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, o_desc, O,
                  FLAGS, stride_ot, stride_oh, q_start, lq, lk, head, m0, n_iter, flag_idx,
                  qk_scale, WG: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr):
        """One warpgroup: query rows ``m0 + WG * 64 ..`` against every loaded K/V tile."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
        dtype: gl.constexpr = q_bufs.dtype
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                     k_width=2)
        row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_l: gl.constexpr = gl.SliceLayout(0, s_layout)

        q_smem = q_bufs.index(WG)
        m0w = m0 + WG * BLOCK_M
        diag = lk - lq  # bottom-right alignment: row i sits at key position i + lk - lq
        q_pos = gl.expand_dims(m0w + gl.arange(0, BLOCK_M, layout=row_l) + diag, 1)
        offs_n = gl.expand_dims(gl.arange(0, BLOCK_N, layout=col_l), 0)
        full_hi = lk  # keys below full_hi are visible to every row of this warpgroup
        if CAUSAL:
            full_hi = gl.minimum(lk, m0w + diag + 1)

        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_l)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_l)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)

        mbarrier.wait(q_bar, 0)
        # Tile 0: S_0 and its softmax, no P V yet.
        mbarrier.wait(k_ready.index(0), 0)
        s_tok = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), zero_s, use_acc=False,
                              is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        mbarrier.arrive(k_empty.index(0), count=1)
        p, m_i, l_i, alpha = _softmax(s, m_i, l_i, 0, full_hi, lk, q_pos, offs_n, qk_scale,
                                      BLOCK_N, CAUSAL)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        for i in range(1, n_iter):
            st = i % STAGES
            ph = (i // STAGES) & 1
            pst = (i - 1) % STAGES
            mbarrier.wait(k_ready.index(st), ph)
            s_tok = warpgroup_mma(q_smem, k_bufs.index(st).permute((1, 0)), zero_s,
                                  use_acc=False, is_async=True)
            # O += P_{i-1} V_{i-1} runs while this tile's softmax does.
            mbarrier.wait(v_ready.index(pst), ((i - 1) // STAGES) & 1)
            acc_tok = warpgroup_mma(p_op, v_bufs.index(pst), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s_tok,))
            mbarrier.arrive(k_empty.index(st), count=1)
            p, m_i, l_i, alpha = _softmax(s, m_i, l_i, i * BLOCK_N, full_hi, lk, q_pos, offs_n,
                                          qk_scale, BLOCK_N, CAUSAL)
            acc, p_op = warpgroup_mma_wait(0, deps=(acc_tok, p_op))
            mbarrier.arrive(v_empty.index(pst), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)

        last = (n_iter - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((n_iter - 1) // STAGES) & 1)
        acc_tok = warpgroup_mma(p_op, v_bufs.index(last), acc, is_async=True)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc_tok, p_op))
        mbarrier.arrive(v_empty.index(last), count=1)

        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        inv = gl.where(l_o > 0.0, 1.0 / l_o, 0.0)  # no key seen: zeros
        out_f = acc * gl.expand_dims(inv, 1)
        # The flag (module docstring): x - x is NaN exactly for NaN and +-Inf.
        r = m0w + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        # No tensor constant here: Gluon (Triton 3.6) gave a zero constant in this layout the
        # registers of the zero accumulator that wgmma overwrites, and a compare against it
        # flagged every clean row on the H200. A row sum of x - x is NaN or 0: compare it
        # with itself. Its threads raise the flag (an atomic max) only for a non-finite row.
        chk = gl.sum(out_f - out_f, axis=1)  # within a warp (a row sits in one quad)
        bad = chk != chk
        gl.atomic_max(FLAGS + flag_idx + WG + r * 0, bad.to(gl.int32), mask=(r < lq) & bad)
        out = out_f.to(dtype)
        if m0w + BLOCK_M <= lq:  # the whole tile is this sequence's: TMA store through Q's slot
            q_smem.store(out)
            fence_async_shared()
            tma.async_copy_shared_to_global(o_desc, [q_start + m0w, head * HEAD_DIM], q_smem)
            tma.store_wait(0)
        else:
            d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
            ptrs = (O + gl.expand_dims((q_start + r).to(gl.int64) * stride_ot, 1)
                    + head * stride_oh + gl.expand_dims(d, 0))
            gl.store(ptrs, out, mask=gl.expand_dims(r < lq, 1) & gl.expand_dims(d < HEAD_DIM, 0))

    @gluon.jit
    def hopper_prefill_kernel(q_desc, k_desc, v_desc, o_desc, O, CU_Q, CU_K, FLAGS,
                              stride_ot, stride_oh, stride_cq, stride_ck, total_q, num_seqs,
                              qk_scale,
                              GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                              STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                              CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        """Program ``(i, b, h)``: rows ``[128 * t, 128 * t + 128)`` of sequence b, head h, with
        ``t`` counted from the sequence's last tile. ``qk_scale`` = scale * log2(e). ``FLAGS``:
        int32 ``[grid0, B + 1, H, 2]``, zeros, raised where an output row is not finite (module
        docstring)."""
        pid = gl.program_id(0)
        seq = gl.program_id(1)
        head = gl.program_id(2)
        flag_idx = ((pid * gl.num_programs(1) + seq) * gl.num_programs(2) + head) * 2
        TILE: gl.constexpr = 2 * BLOCK_M
        if seq == num_seqs:  # rows past cu_seqlens_q[-1]: zeros, strided over the pid axis
            first = gl.load(CU_Q + num_seqs * stride_cq)
            for r0 in range(first + pid * TILE, total_q, gl.num_programs(0) * TILE):
                _zero_rows(O, r0, total_q, head, stride_ot, stride_oh, TILE, HEAD_DIM,
                           gl.num_warps())
            return
        q_start = gl.load(CU_Q + seq * stride_cq)
        lq = gl.load(CU_Q + (seq + 1) * stride_cq) - q_start
        tile = gl.cdiv(lq, TILE) - 1 - pid
        if tile < 0:
            return
        k_start = gl.load(CU_K + seq * stride_ck)
        lk = gl.load(CU_K + (seq + 1) * stride_ck) - k_start
        m0 = tile * TILE
        hi = lk
        if CAUSAL:
            hi = gl.minimum(lk, m0 + TILE + lk - lq)
        if hi <= 0:  # no key for any row of the tile
            _zero_rows(O, q_start + m0, q_start + lq, head, stride_ot, stride_oh, TILE,
                       HEAD_DIM, gl.num_warps())
            return
        n_iter = gl.cdiv(hi, BLOCK_N)

        dtype: gl.constexpr = q_desc.dtype
        q_bufs = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HEAD_DIM], q_desc.layout)
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for s in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(s), count=1)
            mbarrier.init(v_ready.index(s), count=1)
            mbarrier.init(k_empty.index(s), count=2)  # both consumer warpgroups release
            mbarrier.init(v_empty.index(s), count=2)

        q_row = q_start + m0
        kv_col = (head // GROUP) * HEAD_DIM
        gl.warp_specialize([
            (_consumer, (q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty,
                         o_desc, O, FLAGS, stride_ot, stride_oh, q_start, lq, lk, head, m0,
                         n_iter, flag_idx, qk_scale, 0, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                         CAUSAL)),
            (_consumer, (q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty,
                         o_desc, O, FLAGS, stride_ot, stride_oh, q_start, lq, lk, head, m0,
                         n_iter, flag_idx, qk_scale, 1, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                         CAUSAL)),
            (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, k_ready,
                         v_ready, k_empty, v_empty, q_row, head * HEAD_DIM, k_start, kv_col,
                         n_iter, BLOCK_M, BLOCK_N, STAGES)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
