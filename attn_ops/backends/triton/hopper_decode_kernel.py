"""Hopper (sm90) one-token decode in Gluon: the batch's K/V tiles dealt out evenly over the
programs, each program's tiles copied by a producer warp into a TMA ring, the GQA group's rows
on wgmma, the pieces of a (sequence, KV head) merged by their log-sum-exps.

Why a second decode kernel: the Triton decode kernels (decode_kernel.py,
decode_balanced_kernel.py) move K/V through the load/store unit, each thread computing its rows'
addresses, and ncu finds them waiting on those loads (L1TEX scoreboard stalls 47% of the cycles
at B 16 x 2048; BENCHMARKS.md, fourth pass). Here one producer warp copies whole page pieces
into a shared-memory ring by TMA, so the consumer warpgroup issues no load for K/V, and the
bytes in flight per SM are the ring's (two programs per SM at two 32 KB stages each).

Work, computed on the device from ``SEQLENS`` by both partitions alike (no host sync, a static
grid of ``P`` programs), as decode_balanced_kernel.py deals it:

- each (sequence b, KV head g) pair has ``n_b = cdiv(len_b, BLOCK_N)`` key tiles, laid out
  sequence-major, then by KV head, so the batch's ``T = Hkv * sum(n_b)`` tiles form one range;
- program p takes the next ``T // P`` tiles, one more when ``p < T % P``, and walks the pieces
  of the pairs they cross. A pair all of whose tiles fall to one program is written directly.
  Otherwise each piece leaves its normalised partial (float32) and log2-sum-exp in its program's
  slot 0 (the piece holding the program's first tile) or slot 1 (a piece that starts a pair
  and runs past the program's range), and the piece that completes the pair's tile count
  (:func:`_last_to_count_in`) merges them (:func:`_merge_pieces`);
- a sequence with no key gets zeros from program ``b mod P``.

With uniform lengths and ``P`` = the pairs, every program takes one whole pair: the kernel
before the balancing (one program per pair) at the price of reading every length. A batch of
unequal lengths no longer leaves a long sequence's SMs working alone.

Per piece, the producer warp issues, per tile, the block-table entries of its ``BLOCK_N /
PAGE_ROWS`` page pieces (one vector load, the next tile's before the current tile's copies)
and their TMA copies into ring slot ``i % STAGES`` (``i`` counts the program's tiles over all
its pieces) once the consumer released it; a piece past the sequence's keys is a box wholly out
of bounds, which TMA fills with zeros. The first tile's entries are guessed (the tile a uniform
batch would start the program at) and loaded beside the lengths, so that where the guess holds
the first copies wait on one global round trip instead of two. The consumer warpgroup loads the
pair's GROUP query rows as the first rows of one 64-row tile (wgmma's M; the rest zeros), so
each K/V tile is read once for the group: S = Q K^T (wgmma from shared memory), the online
softmax in the exp2 domain, O += P V (P from registers).

Non-finite values: the only keys a row must not see are those past the sequence's length in
its last tile (garbage a cache may hold). Their scores become ``-inf`` and their value rows are
zeroed in shared memory before ``P V`` (``0 * NaN`` would leak otherwise), so a NaN / Inf value
row reaches a row only when the row sees it; a NaN partial reaches the merged row it belongs
to, never another.
"""

from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                                   warpgroup_mma)
    from attn_ops.backends.triton.gluon_api import thread_barrier
    from attn_ops.backends.triton.hopper_prefill_loads import copy_pieces
    GLUON = True
except Exception:  # noqa: BLE001 - an older Triton, or one whose Gluon API moved: no kernel
    GLUON = False

if GLUON:
    BLOCK_M = gl.constexpr(64)  # wgmma's rows per warpgroup: the GROUP query heads, then zeros
    CONSUMER_WARPS = gl.constexpr(4)

    @gluon.jit
    def _add(a, b):
        return a + b

    @gluon.jit
    def _schedule(SEQLENS, stride_sl, batch, num_kv_heads, BLOCK_N: gl.constexpr,
                  B_P2: gl.constexpr, WARPS: gl.constexpr):
        """``(tiles, ends, q, r, start, stop)``: each sequence's key tiles per KV head and the
        end of its tiles in the batch's range (``[B_P2]``, zero past ``batch``), the deal (each
        program ``q`` tiles, one more below program ``r``) and this program's range."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
        offs_b = gl.arange(0, B_P2, layout=layout)
        lens = gl.load(SEQLENS + offs_b * stride_sl, mask=offs_b < batch, other=0)
        tiles = (gl.maximum(lens, 0) + BLOCK_N - 1) // BLOCK_N
        ends = gl.associative_scan(tiles, 0, _add) * num_kv_heads
        total = gl.max(ends, axis=0)
        pid = gl.program_id(0)
        progs = gl.num_programs(0)
        q = total // progs  # int32 divisions (the host keeps the range below 2^31)
        r = total % progs
        start = pid * q + gl.minimum(pid, r)
        return tiles, ends, q, r, start, start + q + (pid < r).to(gl.int32)

    @gluon.jit
    def _piece(tiles, ends, x, stop, SEQLENS, stride_sl, num_kv_heads, BLOCK_N: gl.constexpr):
        """The piece starting at tile ``x`` of the range: ``(sequence, its length, KV head,
        its tile count n, the pair's first tile in the range, the piece's end)``."""
        before = ends <= x
        seq = gl.sum(before.to(gl.int32), axis=0)
        seq_begin = gl.sum(gl.where(before, tiles, 0), axis=0) * num_kv_heads
        lk = gl.load(SEQLENS + seq * stride_sl)  # an L1 hit: read again, not picked out
        n = (lk + BLOCK_N - 1) // BLOCK_N
        kvh = (x - seq_begin) // n
        pair_a = seq_begin + kvh * n
        return seq, lk, kvh, n, pair_a, gl.minimum(stop, pair_a + n)

    @gluon.jit
    def _piece_blocks(table_row, stride_tc, table_width, key0, PAGE: gl.constexpr,
                      PAGE_ROWS: gl.constexpr, PIECES: gl.constexpr):
        """The block-table entries of the ``PIECES`` page pieces of ``PAGE_ROWS`` keys from key
        ``key0`` on (one vector load; a piece past the table's width reads its last entry)."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        keys = key0 + gl.arange(0, PIECES, layout=layout) * PAGE_ROWS
        # int32 coordinates for TMA: an int64 table's entries are block indices, and the
        # host keeps the cache's rows below 2^31 (hopper_decode_launch.cache_view).
        return gl.load(table_row + gl.minimum(keys // PAGE, table_width - 1) * stride_tc
                       ).to(gl.int32)

    @gluon.jit
    def _piece_rows_of(blocks, key0, lk, row0, rows_per_block, PAGE: gl.constexpr,
                       PAGE_ROWS: gl.constexpr, PIECES: gl.constexpr):
        """The TMA rows of the page pieces whose entries :func:`_piece_blocks` loaded from key
        ``key0`` on (``block * rows_per_block + row0 + offset``: see
        :func:`hopper_decode_kernel`); ``-PAGE_ROWS`` (a box wholly out of bounds, which TMA
        fills with zeros) for a piece past the sequence's ``lk`` keys, whose entry may be
        anything."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        keys = key0 + gl.arange(0, PIECES, layout=layout) * PAGE_ROWS
        return gl.where(keys < lk, blocks * rows_per_block + row0 + keys % PAGE, -PAGE_ROWS)

    @gluon.jit
    def _piece_rows(table_row, stride_tc, table_width, key0, lk, row0, rows_per_block,
                    PAGE: gl.constexpr, PAGE_ROWS: gl.constexpr, PIECES: gl.constexpr):
        """:func:`_piece_rows_of` the entries :func:`_piece_blocks` loads."""
        blocks = _piece_blocks(table_row, stride_tc, table_width, key0, PAGE, PAGE_ROWS, PIECES)
        return _piece_rows_of(blocks, key0, lk, row0, rows_per_block, PAGE, PAGE_ROWS, PIECES)

    @gluon.jit
    def _producer(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, SEQLENS,
                  TABLE, stride_sl, stride_tb, stride_tc, table_width, rows_per_block,
                  rows_per_head, cols_per_head, batch, num_kv_heads, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, PAGE: gl.constexpr, PAGE_ROWS: gl.constexpr,
                  B_P2: gl.constexpr):
        """One warp: the program's pieces' K / V tiles into the ring, each tile's table
        entries loaded before the previous tile's copies."""
        PIECES: gl.constexpr = BLOCK_N // PAGE_ROWS
        # A guess, loaded beside the lengths: the first tile's table entries of the sequence
        # this program starts in when the lengths are uniform (program p of P then starts
        # pair p * pairs / P at its first tile: with P = the pairs, every program one pair).
        # Where it holds (the guess is checked below), the first copies wait on one global
        # round trip instead of two (the lengths, then the table): B 16 x 2048, 37.7 us for
        # the balanced kernel without it against 36.96 for the per-pair kernel that loaded
        # its table entries beside its length (twenty-fourth / twenty-fifth passes).
        guess_seq = (gl.program_id(0) * (batch * num_kv_heads) // gl.num_programs(0)
                     ) // num_kv_heads
        guess = _piece_blocks(TABLE + guess_seq.to(gl.int64) * stride_tb, stride_tc,
                              table_width, 0, PAGE, PAGE_ROWS, PIECES)
        tiles, ends, q, r, x, stop = _schedule(SEQLENS, stride_sl, batch, num_kv_heads, BLOCK_N,
                                               B_P2, 1)
        i = 0
        while x < stop:
            seq, lk, kvh, n, pair_a, piece_end = _piece(tiles, ends, x, stop, SEQLENS, stride_sl,
                                                        num_kv_heads, BLOCK_N)
            table_row = TABLE + seq.to(gl.int64) * stride_tb
            row0 = kvh * rows_per_head
            col = kvh * cols_per_head
            t = x - pair_a
            if (i == 0) & (seq == guess_seq) & (t == 0):
                rows = _piece_rows_of(guess, 0, lk, row0, rows_per_block, PAGE, PAGE_ROWS,
                                      PIECES)
            else:
                rows = _piece_rows(table_row, stride_tc, table_width, t * BLOCK_N, lk, row0,
                                   rows_per_block, PAGE, PAGE_ROWS, PIECES)
            for j in range(t, piece_end - pair_a):
                nxt = _piece_rows(table_row, stride_tc, table_width, (j + 1) * BLOCK_N, lk, row0,
                                  rows_per_block, PAGE, PAGE_ROWS, PIECES)
                st = i % STAGES
                ph = (i // STAGES) & 1
                copy_pieces(k_desc, rows, col, k_empty.index(st), k_ready.index(st),
                            k_bufs.index(st), ph, PAGE_ROWS, PIECES)
                copy_pieces(v_desc, rows, col, v_empty.index(st), v_ready.index(st),
                            v_bufs.index(st), ph, PAGE_ROWS, PIECES)
                rows = nxt
                i += 1
            x = piece_end

    @gluon.jit
    def _zero_rows_from(slot, first, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Zero rows ``first ..`` of a ring slot ``[BLOCK_N, HEAD_DIM]`` (16-byte pieces)."""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8],
                                                [CONSUMER_WARPS, 1], [1, 0])
        x = slot.load(layout)
        r = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
        slot.store(gl.where(gl.expand_dims(r < first, 1), x, gl.zeros_like(x)))

    @gluon.jit
    def _last_to_count_in(SEMA, idx, mine, total):
        """Count ``mine`` key tiles in at ``SEMA[idx]``; True in the one program that completes
        ``total``, once every other piece's partial is visible to it (each program stored its
        partial before the call). The two fields and why: split_counters.last_to_count_in."""
        thread_barrier()
        seen = gl.atomic_add(SEMA + idx, mine, sem="acquire")
        last = (seen & 0xFFFF) + mine == total
        if last:
            published = (seen >> 16) & 0xFFFF
            while published < total - mine:  # an earlier arrival still storing its partial
                published = (gl.atomic_add(SEMA + idx, 0, sem="acquire") >> 16) & 0xFFFF
        else:
            gl.atomic_add(SEMA + idx, mine << 16, sem="release")
        return last

    @gluon.jit
    def _owner(tile, q, r):
        """The program whose range holds ``tile`` (programs below ``r`` take ``q + 1``)."""
        big = r * (q + 1)  # the tiles of the first r programs
        return gl.where(tile < big, tile // (q + 1), r + (tile - big) // gl.maximum(q, 1))

    @gluon.jit
    def _merge_pieces(O_PART, LSE_PART, out_ptrs, rows_ok, part_rows, d2, p_first, first_slot,
                      p_last, layout: gl.constexpr, GROUP: gl.constexpr,
                      HEAD_DIM: gl.constexpr):
        """The pair's pieces, programs ``p_first .. p_last`` (the first's in slot
        ``first_slot``, every other's in slot 0), merged by their log2-sum-exps and written
        through ``out_ptrs`` (``[BLOCK_M, HEAD_DIM]``, masked by ``rows_ok``). The partials are
        read through L2 (``.cg``): another program wrote them."""
        m = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, layout))
        den = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, layout))
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout)
        mask = gl.expand_dims(rows_ok, 1)
        for p in range(p_first, p_last + 1):
            slot = p.to(gl.int64) * 2 + gl.where(p == p_first, first_slot, 0)
            lse = gl.load(LSE_PART + slot * GROUP + part_rows, mask=rows_ok, other=0.0,
                          cache_modifier=".cg")
            o = gl.load(O_PART + gl.expand_dims((slot * GROUP + part_rows) * HEAD_DIM, 1) + d2,
                        mask=mask, other=0.0, cache_modifier=".cg")
            m_new = gl.maximum(m, lse)  # every piece saw a key: finite, or NaN from a NaN seen
            alpha = gl.exp2(m - m_new)  # exp2(-inf) = 0 at the first piece
            w = gl.exp2(lse - m_new)
            den = den * alpha + w
            acc = acc * gl.expand_dims(alpha, 1) + o * gl.expand_dims(w, 1)
            m = m_new
        out = acc / gl.expand_dims(den, 1)
        gl.store(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=mask)

    @gluon.jit
    def _zero_empty(O, SEQLENS, stride_sl, stride_ob, stride_oh, batch, num_kv_heads,
                    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Zeros for the sequences with no key, sequence b by program ``b mod P``."""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8],
                                                [CONSUMER_WARPS, 1], [1, 0])
        r = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
        d = gl.expand_dims(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout)), 0)
        zeros = gl.zeros([BLOCK_M, HEAD_DIM], O.dtype.element_ty, layout)
        for b in range(gl.program_id(0), batch, gl.num_programs(0)):
            if gl.load(SEQLENS + b * stride_sl) <= 0:
                for g in range(num_kv_heads):
                    ptrs = (O + b.to(gl.int64) * stride_ob
                            + gl.expand_dims((g * GROUP + r) * stride_oh, 1) + d)
                    gl.store(ptrs, zeros, mask=gl.expand_dims(r < GROUP, 1))

    @gluon.jit
    def _consumer(Q, O, O_PART, LSE_PART, SEMA, SEQLENS, q_smem, k_bufs, v_bufs, k_ready,
                  v_ready, k_empty, v_empty, stride_qb, stride_qh, stride_ob, stride_oh,
                  stride_sl, batch, num_kv_heads, qk_scale, GROUP: gl.constexpr,
                  HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  B_P2: gl.constexpr):
        """The warpgroup: the program's pieces, each its pair's rows against the piece's
        tiles, then the output (or the partial and, in the last piece, the merge)."""
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                     k_width=2)
        q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8],
                                                  [CONSUMER_WARPS, 1], [1, 0])
        row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
        rq = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_layout))
        dq = gl.expand_dims(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, q_layout)), 0)
        ro = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        do = gl.expand_dims(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout)), 0)
        offs_n = gl.expand_dims(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)), 0)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)

        tiles, ends, q, r, start, stop = _schedule(SEQLENS, stride_sl, batch, num_kv_heads,
                                                   BLOCK_N, B_P2, CONSUMER_WARPS)
        pid = gl.program_id(0)
        i = 0
        x = start
        while x < stop:
            seq, lk, kvh, n, pair_a, piece_end = _piece(tiles, ends, x, stop, SEQLENS, stride_sl,
                                                        num_kv_heads, BLOCK_N)
            # The pair's query rows (zeros below them) into shared memory, as wgmma's A (the
            # last piece's wgmma, synchronous, has read it).
            q_ptrs = (Q + seq.to(gl.int64) * stride_qb
                      + gl.expand_dims((kvh * GROUP + rq) * stride_qh, 1) + dq)
            q_smem.store(gl.load(q_ptrs, mask=gl.expand_dims(rq < GROUP, 1), other=0.0))
            fence_async_shared()

            m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_l)
            l_i = gl.zeros([BLOCK_M], gl.float32, row_l)
            acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
            for j in range(x - pair_a, piece_end - pair_a):
                st = i % STAGES
                ph = (i // STAGES) & 1
                keys = j * BLOCK_N
                mbarrier.wait(k_ready.index(st), ph)
                s = warpgroup_mma(q_smem, k_bufs.index(st).permute((1, 0)), zero_s,
                                  use_acc=False)
                mbarrier.arrive(k_empty.index(st), count=1)
                # Every tile holds a key of the sequence, so each row's maximum is finite (or
                # NaN from a NaN it sees); only the pair's last may hold keys past it.
                last = keys + BLOCK_N > lk
                if last:
                    s = gl.where((keys + offs_n) < lk, s, float("-inf"))
                m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
                p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
                alpha = gl.exp2(m_i - m_new)
                l_i = l_i * alpha + gl.sum(p, axis=1)
                m_i = m_new
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)),
                                           1)
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                mbarrier.wait(v_ready.index(st), ph)
                if last:  # value rows past the sequence (the module docstring)
                    _zero_rows_from(v_bufs.index(st), lk - keys, BLOCK_N, HEAD_DIM)
                    fence_async_shared()
                acc = warpgroup_mma(p_op, v_bufs.index(st), acc)
                mbarrier.arrive(v_empty.index(st), count=1)
                i += 1

            l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
            out = acc * gl.expand_dims(1.0 / l_o, 1)  # every piece saw a key: l > 0 (or NaN)
            rows_ok = ro < GROUP
            out_ptrs = (O + seq.to(gl.int64) * stride_ob
                        + gl.expand_dims((kvh * GROUP + ro) * stride_oh, 1) + do)
            if (x == pair_a) & (piece_end == pair_a + n):  # the whole pair: written here
                gl.store(out_ptrs, out.to(O.dtype.element_ty), mask=gl.expand_dims(rows_ok, 1))
            else:  # a piece: its partial, in slot 0 when it holds the program's first tile
                slot = pid.to(gl.int64) * 2 + (x != start).to(gl.int64)
                lse = gl.convert_layout(m_i, gl.SliceLayout(1, o_layout)) + gl.log2(l_o)
                gl.store(O_PART + gl.expand_dims((slot * GROUP + ro) * HEAD_DIM, 1) + do, out,
                         mask=gl.expand_dims(rows_ok, 1))
                gl.store(LSE_PART + slot * GROUP + ro, lse, mask=rows_ok)
                if _last_to_count_in(SEMA, seq * num_kv_heads + kvh, piece_end - x, n):
                    p_first = _owner(pair_a, q, r)
                    first_slot = (p_first * q + gl.minimum(p_first, r) != pair_a).to(gl.int64)
                    _merge_pieces(O_PART, LSE_PART, out_ptrs, rows_ok, ro, do, p_first,
                                  first_slot, _owner(pair_a + n - 1, q, r), o_layout, GROUP,
                                  HEAD_DIM)
                    gl.store(SEMA + seq * num_kv_heads + kvh, 0)
            x = piece_end
        _zero_empty(O, SEQLENS, stride_sl, stride_ob, stride_oh, batch, num_kv_heads, GROUP,
                    HEAD_DIM)

    @gluon.jit
    def hopper_decode_kernel(k_desc, v_desc, Q, O, O_PART, LSE_PART, SEMA, SEQLENS, TABLE,
                             stride_qb, stride_qh, stride_ob, stride_oh, stride_sl, stride_tb,
                             stride_tc, table_width, rows_per_block, rows_per_head,
                             cols_per_head, batch, num_kv_heads, qk_scale,
                             GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                             BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PAGE: gl.constexpr,
                             PAGE_ROWS: gl.constexpr, B_P2: gl.constexpr,
                             PRODUCER_REGS: gl.constexpr):
        """Grid ``(P,)``. q ``[B, H, D]`` (``Q``, strides ``stride_qb``, ``stride_qh``; fp16 /
        bf16; ``B = batch`` at most ``B_P2``, ``H = num_kv_heads * GROUP``), caches of q's
        dtype read through ``k_desc`` / ``v_desc``: a row matrix with boxes of ``PAGE_ROWS``
        rows, where key ``j`` of a block, KV head ``g``, is row ``block * rows_per_block + g *
        rows_per_head + j`` at column ``g * cols_per_head`` (token-major pages: ``[blocks *
        PAGE, Hkv * D]``; heads-major: ``[blocks * Hkv * PAGE, D]``), ``SEQLENS`` int32 ``[B]``,
        ``TABLE`` int32 ``[B, table_width]``. ``qk_scale`` = scale * log2(e). ``O_PART`` float32
        ``[P * 2 * GROUP, D]`` and ``LSE_PART`` float32 ``[P * 2 * GROUP]`` (two slots a
        program), ``SEMA`` one zeroed int32 counter per (sequence, KV head), left zero. Output
        ``O`` ``[B, H, D]`` in q's dtype (strides ``stride_ob``, ``stride_oh``)."""
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
            (_consumer, (Q, O, O_PART, LSE_PART, SEMA, SEQLENS, q_smem, k_bufs, v_bufs, k_ready,
                         v_ready, k_empty, v_empty, stride_qb, stride_qh, stride_ob, stride_oh,
                         stride_sl, batch, num_kv_heads, qk_scale, GROUP, HEAD_DIM, BLOCK_N,
                         STAGES, B_P2)),
            (_producer, (k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty,
                         SEQLENS, TABLE, stride_sl, stride_tb, stride_tc, table_width,
                         rows_per_block, rows_per_head, cols_per_head, batch, num_kv_heads,
                         BLOCK_N, STAGES, PAGE, PAGE_ROWS, B_P2)),
        ], [1], [PRODUCER_REGS])
