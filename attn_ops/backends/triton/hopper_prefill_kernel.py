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

Contract gap (ISOLATE off): a NaN/Inf value row that a query row must not see (hidden by
causality on the diagonal tile, or the next sequence's row in the last tile) still reaches that
row through ``0 * NaN`` in ``P V``. The backend therefore never calls this kernel alone: its
entry point, hopper_prefill_launch.prefill_guarded, scans V first and lets the isolating
FA2-style kernel write the output when a value is non-finite (the ``GATE`` argument).
``ISOLATE=True`` (experimental, never set by the backend) adds a sanitizer warp that zeroes such
rows in shared memory and marks the rows that do see one; on the H200 it failed the odd-length
GPU tests with spurious NaN rows (not yet found why).

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
    def _sanitizer(v_bufs, bad_smem, v_ready, v_clean, n_iter, i_iso, lk,
                   BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
        """One warp, on the tiles ``i >= i_iso`` (those holding a key that some row of the
        program must not see: the causal diagonal, the sequence's last partial tile): zeroes the
        value rows that are not finite, in shared memory, so ``0 * NaN`` in ``P V`` cannot carry
        them into rows that do not see them, then releases the tile on ``v_clean`` (its own ring:
        k-th such tile, slot ``k % STAGES``). ``bad_smem`` gets the lowest such key below lk:
        the consumers turn the rows that see it NaN (the reference's rule; visible keys are a
        prefix). 8 rows at a time: the partition has 24 registers."""
        ROWS: gl.constexpr = 8
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [1, 1], [1, 0])
        one: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        bad = lk
        for i in range(i_iso, n_iter):
            st = i % STAGES
            mbarrier.wait(v_ready.index(st), (i // STAGES) & 1)
            for r in gl.static_range(BLOCK_N // ROWS):
                part = v_bufs.index(st).slice(r * ROWS, ROWS)
                chunk = part.load(blk)
                vs = gl.sum(chunk.to(gl.float32), axis=1)
                fin = (vs - vs) == 0.0  # False for a row holding NaN or +-Inf
                keys = i * BLOCK_N + r * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, blk))
                bad = gl.minimum(bad, gl.min(gl.where(fin | (keys >= lk), lk, keys), axis=0))
                if gl.min(fin.to(gl.int32), axis=0) == 0:
                    part.store(gl.where(gl.expand_dims(fin, 1), chunk, gl.zeros_like(chunk)))
            fence_async_shared()
            bad_smem.store(gl.full([1], 0, gl.int32, one) + bad)
            k = i - i_iso
            mbarrier.arrive(v_clean.index(k % STAGES), count=1)

    @gluon.jit
    def _wait_v(j, i_iso, v_ready, v_clean, STAGES: gl.constexpr, ISOLATE: gl.constexpr):
        """Wait until V_j may enter ``P V``: loaded, and sanitized when it needs to be."""
        if ISOLATE:
            if j >= i_iso:
                k = j - i_iso
                mbarrier.wait(v_clean.index(k % STAGES), (k // STAGES) & 1)
            else:
                mbarrier.wait(v_ready.index(j % STAGES), (j // STAGES) & 1)
        else:
            mbarrier.wait(v_ready.index(j % STAGES), (j // STAGES) & 1)

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
    def _consumer(q_bufs, k_bufs, v_bufs, bad_smem, q_bar, k_ready, v_ready, v_clean, k_empty,
                  v_empty, o_desc, O, stride_ot, stride_oh, q_start, lq, lk, head, m0, n_iter,
                  i_iso, qk_scale,
                  WG: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                  ISOLATE: gl.constexpr):
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
            _wait_v(i - 1, i_iso, v_ready, v_clean, STAGES, ISOLATE)
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
        _wait_v(n_iter - 1, i_iso, v_ready, v_clean, STAGES, ISOLATE)
        acc_tok = warpgroup_mma(p_op, v_bufs.index(last), acc, is_async=True)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc_tok, p_op))
        mbarrier.arrive(v_empty.index(last), count=1)

        if ISOLATE:
            if n_iter > i_iso:  # rows that see a non-finite value row the sanitizer zeroed
                bad = gl.min(bad_smem.load(gl.BlockedLayout([1], [32], [4], [0])), axis=0)
                pos = m0w + diag + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
                if CAUSAL:
                    sees = pos >= bad
                else:
                    sees = pos * 0 + bad < lk
                acc = gl.where(gl.expand_dims(sees, 1), float("nan"), acc)
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        inv = gl.where(l_o > 0.0, 1.0 / l_o, 0.0)  # no key seen: zeros
        out = (acc * gl.expand_dims(inv, 1)).to(dtype)
        if m0w + BLOCK_M <= lq:  # the whole tile is this sequence's: TMA store through Q's slot
            q_smem.store(out)
            fence_async_shared()
            tma.async_copy_shared_to_global(o_desc, [q_start + m0w, head * HEAD_DIM], q_smem)
            tma.store_wait(0)
        else:
            r = m0w + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
            d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
            ptrs = (O + gl.expand_dims((q_start + r).to(gl.int64) * stride_ot, 1)
                    + head * stride_oh + gl.expand_dims(d, 0))
            gl.store(ptrs, out, mask=gl.expand_dims(r < lq, 1) & gl.expand_dims(d < HEAD_DIM, 0))

    @gluon.jit
    def hopper_prefill_kernel(q_desc, k_desc, v_desc, o_desc, O, CU_Q, CU_K, GATE,
                              stride_ot, stride_oh, stride_cq, stride_ck, total_q, num_seqs,
                              qk_scale,
                              GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                              STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                              ISOLATE: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                              PRODUCER_REGS: gl.constexpr, GATE_PARTS: gl.constexpr = 0,
                              GATE_P2: gl.constexpr = 1):
        """Program ``(i, b, h)``: rows ``[128 * t, 128 * t + 128)`` of sequence b, head h, with
        ``t`` counted from the sequence's last tile. ``qk_scale`` = scale * log2(e).
        ``GATE_PARTS > 0``: ``GATE`` holds finite_check_kernel's parts, and the program returns
        at once when one is non-zero (a non-finite value row: the isolating kernel runs)."""
        if GATE_PARTS > 0:
            gate_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
            offs_g = gl.arange(0, GATE_P2, layout=gate_layout)
            if gl.max(gl.load(GATE + offs_g, mask=offs_g < GATE_PARTS, other=0), axis=0) != 0:
                return
        pid = gl.program_id(0)
        seq = gl.program_id(1)
        head = gl.program_id(2)
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
        iso_hi = lk  # keys below iso_hi are visible to every row of the program
        if CAUSAL:
            iso_hi = gl.minimum(lk, m0 + lk - lq + 1)
        i_iso = iso_hi // BLOCK_N  # tiles from i_iso on hold a key some row must not see
        bad_smem = gl.allocate_shared_memory(gl.int32, [1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        v_clean = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(v_clean.index(s), count=1)
        if ISOLATE:
            gl.warp_specialize([
                (_consumer, (q_bufs, k_bufs, v_bufs, bad_smem, q_bar, k_ready, v_ready, v_clean,
                             k_empty, v_empty, o_desc, O, stride_ot, stride_oh, q_start, lq, lk,
                             head, m0, n_iter, i_iso, qk_scale, 0, BLOCK_M, BLOCK_N, HEAD_DIM,
                             STAGES, CAUSAL, ISOLATE)),
                (_consumer, (q_bufs, k_bufs, v_bufs, bad_smem, q_bar, k_ready, v_ready, v_clean,
                             k_empty, v_empty, o_desc, O, stride_ot, stride_oh, q_start, lq, lk,
                             head, m0, n_iter, i_iso, qk_scale, 1, BLOCK_M, BLOCK_N, HEAD_DIM,
                             STAGES, CAUSAL, ISOLATE)),
                (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, k_ready,
                             v_ready, k_empty, v_empty, q_row, head * HEAD_DIM, k_start, kv_col,
                             n_iter, BLOCK_M, BLOCK_N, STAGES)),
                (_sanitizer, (v_bufs, bad_smem, v_ready, v_clean, n_iter, i_iso, lk, BLOCK_N,
                              HEAD_DIM, STAGES)),
            ], [4, 1, 1], [CONSUMER_REGS, PRODUCER_REGS, PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_consumer, (q_bufs, k_bufs, v_bufs, bad_smem, q_bar, k_ready, v_ready, v_clean,
                             k_empty, v_empty, o_desc, O, stride_ot, stride_oh, q_start, lq, lk,
                             head, m0, n_iter, i_iso, qk_scale, 0, BLOCK_M, BLOCK_N, HEAD_DIM,
                             STAGES, CAUSAL, ISOLATE)),
                (_consumer, (q_bufs, k_bufs, v_bufs, bad_smem, q_bar, k_ready, v_ready, v_clean,
                             k_empty, v_empty, o_desc, O, stride_ot, stride_oh, q_start, lq, lk,
                             head, m0, n_iter, i_iso, qk_scale, 1, BLOCK_M, BLOCK_N, HEAD_DIM,
                             STAGES, CAUSAL, ISOLATE)),
                (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, k_ready,
                             v_ready, k_empty, v_empty, q_row, head * HEAD_DIM, k_start, kv_col,
                             n_iter, BLOCK_M, BLOCK_N, STAGES)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])

