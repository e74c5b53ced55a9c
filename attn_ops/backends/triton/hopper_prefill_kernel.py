"""Hopper (sm90) varlen prefill in Gluon: persistent, TMA ring, async wgmma, warp specialization.

Work items are query tiles of ``CONSUMERS * 64`` rows of one sequence and one head, numbered and
handed to a persistent grid of about one program per SM (two with one consumer) as
hopper_prefill_items.py says (program p takes items ``p, p + P, ...``); an item past its
sequence's tiles costs a few loads. Cheap items numbered among the real ones gave some programs
three real items where the mean was two (2 chunks of 512 queries over 4k paged prefixes, 256
real items on 132 SMs; the split route's 56 decode sequences beside them). Inside a program
three partitions walk the same items (two with ``CONSUMERS`` = 1: short causal prompts, where
two programs per SM let each warpgroup run its own items; hopper_prefill_forms.SOLO_MAX_KEYS
says why; and few queries per sequence in the packed form, whose items hold the query heads of
a KV head: the entry's docstring):

- a producer warp issues TMA loads: an item's 64-row Q tiles (one per consumer), then its K and V
  tiles of BLOCK_N keys into a STAGES-deep shared-memory ring (one ready and one empty mbarrier
  per stage and operand, so a K slot is refilled as soon as both consumers have read it, before V
  is done). The ring and its phases run on across items, and the next item's Q is loaded as soon
  as both consumers have issued their last ``Q K^T`` of the current one (``q_empty``), so the next
  item's loads overlap this item's last ``P V``, its epilogue and the next item's start;
- two consumer warpgroups (the default partition and one worker; or the default partition alone),
  64 query rows each, read the same K/V slots. The source overlaps the next tile's ``Q K^T`` and
  its softmax with the previous tile's ``P V`` (issue S_j, issue O += P_{j-1} V_{j-1}, wait for
  S_j, softmax, wait for O, rescale); the warp schedulers interleave the two warpgroups, so one's
  softmax runs against the other's MMAs. As compiled, the in-warpgroup overlap does not happen,
  and FA3's ping-pong measured slower: docs/backends.md, "the Gluon prefill's consumers, as
  compiled". In a sequence's last tile of at most 64 rows the second warpgroup has no row: it
  passes the item's ring slots without a wgmma (:func:`_pass_item`; 7% at 96 prompts of U(1,
  400)).

P stays in registers as wgmma's A operand. Causal tiles past the diagonal are never loaded;
masks are applied only on tiles that need them (the diagonal and the sequence's last partial
tile). K/V come from the packed ``[Tk, Hkv * D]`` rows through 2-D TMA descriptors, so a tile's
tail can hold the next sequence's keys (or TMA's zero fill past Tk): their scores are ``-inf``.
A paged cache (``PAGE`` > 0: ``[blocks, page, Hkv, D]`` read as ``[blocks * page, Hkv * D]``
rows) fills a slot with ``BLOCK_N / PAGE_ROWS`` copies of page pieces into row slices of it
(16-row multiples: whole 8-row swizzle atoms), their blocks read from the block table with one
vector load per tile; a piece past the sequence's keys is a box wholly out of bounds, so zeros.
Rows past ``cu_seqlens_q[-1]`` are zeroed by the items of the extra ``b = B`` column; a query
row that sees no key gets zeros.

Non-finite values: a NaN/Inf value row that a query row must not see (hidden by causality on
the diagonal tile, or the next sequence's row in the last tile) still reaches that row through
``0 * NaN`` in ``P V``; such a row then holds a non-finite output. So each consumer checks its
output rows (those below lq) and writes int32 flags ``FLAGS[g, b, h, f]`` (in row order; one
per warpgroup of 64 rows with two consumers, one per warp of 16 rows with one): 1 when one of
its rows is not finite (a leak, or a row that legitimately sees a NaN/Inf), else 0. Every item
writes all its flags, those with nothing to compute included, so the caller hands over
uninitialised flags (a memset per call cost 9 us of host time on the H200 host). The backend's
entry point, hopper_prefill_launch.prefill_guarded, then launches the isolating FA2-style
kernel in its fixup mode, which rewrites exactly the half tiles holding a flagged row and
returns at once when none is set. A finite output row cannot hide a leak (NaN and Inf never turn
finite through ``P V``), so with finite outputs this kernel's result stands.

Needs Triton with Gluon's Hopper API (tested: 3.6); the host side (descriptors, grid, the
supports / available checks) is hopper_prefill_launch.py.
"""

from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from attn_ops.backends.triton.gluon_api import tma_load
    from attn_ops.backends.triton.hopper_prefill_items import any_item, sequences_with_items
    from attn_ops.backends.triton.hopper_prefill_loads import copy_pieces, load_q, page_rows
    from attn_ops.backends.triton.hopper_prefill_softmax import (finish_rows, online_softmax,
                                                                 sink_logits)
    from attn_ops.backends.triton.hopper_prefill_writes import (flag_slots, pass_packed_item,
                                                                store_flags, zero_rows,
                                                                zero_unvisited_flags)
    GLUON = True
except Exception:  # noqa: BLE001 - an older Triton, or one whose Gluon API moved: no kernel
    GLUON = False

if GLUON:
    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready,
                  v_ready, k_empty, v_empty, CU_Q, CU_K, TABLE, stride_cq, stride_ck, stride_tb,
                  stride_tc, table_width, num_seqs, num_heads, tiles, min_q,
                  GROUP: gl.constexpr,
                  HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, CAUSAL: gl.constexpr, PAGE: gl.constexpr,
                  PAGE_ROWS: gl.constexpr, COMPACT: gl.constexpr, CONSUMERS: gl.constexpr,
                  PACK: gl.constexpr):
        """One warp: per item, Q (``CONSUMERS`` tiles of 64 rows, or the packed form's heads:
        hopper_prefill_loads.load_q) once the consumers released the previous item's Q, then
        K_j / V_j into ring slot ``(it + j) % STAGES`` when the consumers have released it (empty
        barriers count one arrival per consumer; a fresh barrier passes phase 1). Paged K/V
        (``PAGE`` > 0): a tile is ``BLOCK_N // PAGE_ROWS`` TMA copies, one per page piece, into
        row slices of the slot (see hopper_prefill_loads.page_rows)."""
        it = 0  # K/V tiles loaded so far, over all items: the ring's position
        done = 0  # items loaded so far: the Q barriers' phase
        n_real = sequences_with_items(CU_Q, stride_cq, num_seqs, min_q, 1, COMPACT)
        for w in range(gl.program_id(0), tiles * (n_real + 1) * num_heads, gl.num_programs(0)):
            g, seq, head, q_start, lq, m0, k_start, lk, n_iter = any_item(
                w, CU_Q, CU_K, stride_cq, stride_ck, num_seqs, num_heads, tiles, n_real, min_q,
                CONSUMERS * BLOCK_M, BLOCK_N, CAUSAL, 1, COMPACT, PACK)
            if n_iter > 0:
                mbarrier.wait(q_empty, (done & 1) ^ 1)
                load_q(q_desc, q_bufs, q_bar, q_start + m0, head, HEAD_DIM, BLOCK_M, CONSUMERS,
                       PACK)
                kv_col = (head // GROUP) * HEAD_DIM
                for i in range(n_iter):
                    st = (it + i) % STAGES
                    ph = ((it + i) // STAGES) & 1
                    if PAGE == 0:
                        row = k_start + i * BLOCK_N
                        mbarrier.wait(k_empty.index(st), ph ^ 1)
                        mbarrier.expect(k_ready.index(st), k_desc.block_type.nbytes)
                        tma_load(k_desc, [row, kv_col], k_ready.index(st), k_bufs.index(st))
                        mbarrier.wait(v_empty.index(st), ph ^ 1)
                        mbarrier.expect(v_ready.index(st), v_desc.block_type.nbytes)
                        tma_load(v_desc, [row, kv_col], v_ready.index(st), v_bufs.index(st))
                    else:
                        PIECES: gl.constexpr = BLOCK_N // PAGE_ROWS
                        rows = page_rows(TABLE + seq * stride_tb, stride_tc, table_width,
                                         i * BLOCK_N, lk, PAGE, PAGE_ROWS, PIECES)
                        copy_pieces(k_desc, rows, kv_col, k_empty.index(st), k_ready.index(st),
                                    k_bufs.index(st), ph, PAGE_ROWS, PIECES)
                        copy_pieces(v_desc, rows, kv_col, v_empty.index(st), v_ready.index(st),
                                    v_bufs.index(st), ph, PAGE_ROWS, PIECES)
                it += n_iter
                done += 1

    @gluon.jit
    def _attend(q_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, O,
                FLAGS, LSE, SINK_LOGITS, stride_ot, stride_oh, stride_sk, q_start, lq, lk, head,
                num_heads, m0, n_iter, it, done, flag_idx, qk_scale, WG: gl.constexpr,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                STAGES: gl.constexpr, CAUSAL: gl.constexpr, STAGE_OUT: gl.constexpr,
                CONSUMERS: gl.constexpr, PACK: gl.constexpr, SINKS: gl.constexpr,
                WITH_LSE: gl.constexpr):
        """One warpgroup, one item: query rows ``m0 + WG * 64 ..`` of head ``head`` against the
        item's K/V tiles (ring slots from ``it`` on), out and its flags written (and with
        ``WITH_LSE`` its rows' lse; ``SINKS``: each head's sink logit joins the denominator).
        Packed (``PACK`` > 1): row r is token ``m0 + r % TOK`` of head ``head + r // TOK`` (TOK =
        64 / PACK)."""
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
        TOK: gl.constexpr = BLOCK_M // PACK  # tokens per head of the tile
        rows = gl.arange(0, BLOCK_M, layout=row_l)
        if PACK > 1:
            rows = rows % TOK
        q_pos = gl.expand_dims(m0w + rows + diag, 1)
        offs_n = gl.expand_dims(gl.arange(0, BLOCK_N, layout=col_l), 0)
        full_hi = lk  # keys below full_hi are visible to every row of this warpgroup
        if CAUSAL:
            full_hi = gl.minimum(lk, m0w + diag + 1)

        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_l)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_l)
        sink2 = 0.0
        if SINKS:
            sink2 = sink_logits(SINK_LOGITS, stride_sk, head, gl.SliceLayout(1, o_layout),
                                BLOCK_M, PACK)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)

        mbarrier.wait(q_bar, done & 1)
        # Tile 0: S_0 and its softmax, no P V yet.
        st = it % STAGES
        mbarrier.wait(k_ready.index(st), (it // STAGES) & 1)
        s_tok = warpgroup_mma(q_smem, k_bufs.index(st).permute((1, 0)), zero_s, use_acc=False,
                              is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        mbarrier.arrive(k_empty.index(st), count=1)
        p, m_i, l_i, alpha = online_softmax(s, m_i, l_i, 0, full_hi, lk, q_pos, offs_n,
                                            qk_scale, BLOCK_N, CAUSAL)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        for i in range(1, n_iter):
            j = it + i
            st = j % STAGES
            pst = (j - 1) % STAGES
            mbarrier.wait(k_ready.index(st), (j // STAGES) & 1)
            s_tok = warpgroup_mma(q_smem, k_bufs.index(st).permute((1, 0)), zero_s,
                                  use_acc=False, is_async=True)
            # O += P_{i-1} V_{i-1} runs while this tile's softmax does.
            mbarrier.wait(v_ready.index(pst), ((j - 1) // STAGES) & 1)
            acc_tok = warpgroup_mma(p_op, v_bufs.index(pst), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s_tok,))
            mbarrier.arrive(k_empty.index(st), count=1)
            p, m_i, l_i, alpha = online_softmax(s, m_i, l_i, i * BLOCK_N, full_hi, lk, q_pos,
                                                offs_n, qk_scale, BLOCK_N, CAUSAL)
            acc, p_op = warpgroup_mma_wait(0, deps=(acc_tok, p_op))
            mbarrier.arrive(v_empty.index(pst), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
        # Every Q K^T of this item has completed: the producer may load the next item's Q.
        mbarrier.arrive(q_empty, count=1)

        j = it + n_iter - 1
        last = j % STAGES
        mbarrier.wait(v_ready.index(last), (j // STAGES) & 1)
        acc_tok = warpgroup_mma(p_op, v_bufs.index(last), acc, is_async=True)
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        if SINKS or WITH_LSE:  # the rows' finish while the last P V runs
            inv = finish_rows(l_o, gl.convert_layout(m_i, gl.SliceLayout(1, o_layout)), sink2,
                              LSE, q_start, lq, head, num_heads, m0w, BLOCK_M, PACK, SINKS,
                              WITH_LSE)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc_tok, p_op))
        mbarrier.arrive(v_empty.index(last), count=1)

        if not (SINKS or WITH_LSE):
            inv = gl.where(l_o > 0.0, 1.0 / l_o, 0.0)  # no key seen: zeros
        out_f = acc * gl.expand_dims(inv, 1)
        r = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        if PACK > 1:
            r = r % TOK
        r = m0w + r
        # The flags (module docstring). No tensor constant here: Gluon (Triton 3.6) gave a zero
        # constant in this layout the registers of the zero accumulator that wgmma overwrites,
        # and a compare against it flagged every clean row on the H200. A row sum of x - x is
        # NaN or 0: compare it with itself (within a warp: a row sits in one quad).
        chk = gl.sum(out_f - out_f, axis=1)
        bad = (chk != chk) & (r < lq)
        if CONSUMERS == 1:
            # One flag per warp: wgmma's layout gives warp w rows 16 w .. 16 w + 15, so the
            # reduction stays in the warp (shuffles), where one flag for the 64 rows took three
            # warpgroup barriers through shared memory.
            per_warp = gl.max(gl.reshape(bad.to(gl.int32), [4, BLOCK_M // 4]), axis=1)
            warp = gl.arange(0, 4, layout=per_warp.type.layout)
            gl.store(FLAGS + flag_idx + flag_slots(warp, (m0w % 64) // 16, PACK), per_warp)
        else:
            # One per warpgroup: per warp, the two-consumer build's whole schedule changed and
            # measured no faster (H200 graph replays, 16 x 1024 and 4 x 4096; its own four
            # copies of the flag made ptxas spill), so its compiled code stays as it was.
            store_flags(FLAGS + flag_idx + WG, gl.max(bad.to(gl.int32), axis=0), 1)
        # STAGE_OUT: stored in 16-byte pieces, whole rows per warp, through a shared-memory
        # scratch tile; wgmma's layout gives a thread 4-byte pieces of 8 rows, and storing from
        # it cost 6-20% (H200 graph replays, 64 x 256: 192 vs 160 us; 4 x 4096: 1033 vs 972).
        # Not a TMA store: a box would write the next sequence's rows. With one consumer each
        # warp stores its own 16 rows (a thread: HEAD_DIM / 16 rows of 16 bytes), so the
        # exchange stays in the warp and the item's store needs one warpgroup barrier (the
        # scratch's reuse) where rows spread over the warps took four; with two consumers that
        # layout spilled 20 bytes (D 128 causal, ptxas for sm_90a), so they keep the spread.
        out_t = out_f.to(dtype)
        if CONSUMERS == 1:
            st_layout: gl.constexpr = gl.BlockedLayout([HEAD_DIM // 16, 8],
                                                       [256 // HEAD_DIM, HEAD_DIM // 8],
                                                       [4, 1], [1, 0])
        else:
            st_layout: gl.constexpr = gl.BlockedLayout([1, 8], [256 // HEAD_DIM, HEAD_DIM // 8],
                                                       [4, 1], [1, 0])
        if STAGE_OUT:
            out_t = gl.convert_layout(out_t, st_layout)
        rl = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_t.type.layout))
        d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, out_t.type.layout))
        if PACK > 1:
            r = m0w + rl % TOK
            ptrs = (O + gl.expand_dims((q_start + r).to(gl.int64) * stride_ot
                                       + (head + rl // TOK) * stride_oh, 1)
                    + gl.expand_dims(d, 0))
        else:
            r = m0w + rl
            ptrs = (O + gl.expand_dims((q_start + r).to(gl.int64) * stride_ot, 1)
                    + head * stride_oh + gl.expand_dims(d, 0))
        gl.store(ptrs, out_t, mask=gl.expand_dims(r < lq, 1) & gl.expand_dims(d < HEAD_DIM, 0))

    @gluon.jit
    def _pass_item(q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, n_iter, it, done,
                   STAGES: gl.constexpr):
        """One warpgroup whose 64 rows all lie past the item's sequence (a last tile of at most
        64 rows): the ring's barriers passed without a wgmma, so the other warpgroup has the
        tensor cores alone. Each slot is released only once its fill has landed (and Q's once
        Q's has): an empty barrier counts two arrivals, and one warpgroup arriving twice for a
        slot before the other once would free it early."""
        mbarrier.wait(q_bar, done & 1)
        for i in range(n_iter):
            j = it + i
            st = j % STAGES
            ph = (j // STAGES) & 1
            mbarrier.wait(k_ready.index(st), ph)
            mbarrier.arrive(k_empty.index(st), count=1)
            mbarrier.wait(v_ready.index(st), ph)
            mbarrier.arrive(v_empty.index(st), count=1)
        mbarrier.arrive(q_empty, count=1)

    @gluon.jit
    def _consumer(q_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, O,
                  FLAGS, LSE, SINK_LOGITS, CU_Q, CU_K, stride_ot, stride_oh, stride_cq,
                  stride_ck, stride_sk, total_q, num_seqs, num_heads, tiles, min_q, qk_scale,
                  WG: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                  COMPACT: gl.constexpr, STAGE_OUT: gl.constexpr, CONSUMERS: gl.constexpr,
                  PACK: gl.constexpr, SINKS: gl.constexpr, WITH_LSE: gl.constexpr):
        """One warpgroup over the program's items: :func:`_attend` for those with keys; the
        first warpgroup also writes the zeros (padding rows, tiles that see no key; their lse
        ``-inf``)."""
        TILE: gl.constexpr = CONSUMERS * BLOCK_M
        it = 0
        done = 0
        n_real = sequences_with_items(CU_Q, stride_cq, num_seqs, min_q, 4, COMPACT)
        for w in range(gl.program_id(0), tiles * (n_real + 1) * num_heads, gl.num_programs(0)):
            g, seq, head, q_start, lq, m0, k_start, lk, n_iter = any_item(
                w, CU_Q, CU_K, stride_cq, stride_ck, num_seqs, num_heads, tiles, n_real, min_q,
                TILE, BLOCK_N, CAUSAL, 4, COMPACT, PACK)
            flag_idx = ((g * (num_seqs + 1) + seq) * num_heads + head) * 2 * (3 - CONSUMERS)
            if (n_iter > 0) & (m0 + WG * BLOCK_M < lq):
                _attend(q_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, k_empty,
                        v_empty, O, FLAGS, LSE, SINK_LOGITS, stride_ot, stride_oh, stride_sk,
                        q_start, lq, lk, head, num_heads, m0, n_iter, it, done, flag_idx,
                        qk_scale, WG, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, STAGE_OUT,
                        CONSUMERS, PACK, SINKS, WITH_LSE)
                it += n_iter
                done += 1
            elif n_iter > 0:  # no row of this warpgroup's: a last tile of at most 64 rows
                _pass_item(q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, n_iter, it,
                           done, STAGES)
                store_flags(FLAGS + flag_idx + WG, 0, 4 if CONSUMERS == 1 else 1)
                it += n_iter
                done += 1
            elif PACK > 1:  # a packed item with nothing to compute
                pass_packed_item(O, LSE, FLAGS + flag_idx, CU_Q, stride_cq, num_seqs,
                                 num_heads, seq, head, q_start, lq, m0, total_q, tiles,
                                 stride_ot, stride_oh, HEAD_DIM, PACK, WITH_LSE)
            else:
                store_flags(FLAGS + flag_idx + WG, 0, 4 if CONSUMERS == 1 else 1)
                if WG == 0:
                    if seq == num_seqs:  # rows past cu_seqlens_q[-1], strided over g
                        if COMPACT:  # the flags no item writes
                            zero_unvisited_flags(FLAGS, CU_Q, stride_cq, num_seqs, num_heads,
                                                 min_q, g, head, 2 * (3 - CONSUMERS))
                        first = gl.load(CU_Q + num_seqs * stride_cq)
                        for r0 in range(first + g * TILE, total_q, tiles * TILE):
                            zero_rows(O, LSE, r0, total_q, head, num_heads, stride_ot,
                                      stride_oh, TILE, HEAD_DIM, 4, WITH_LSE)
                    elif m0 >= 0:  # a tile with no key for any row
                        zero_rows(O, LSE, q_start + m0, q_start + lq, head, num_heads,
                                  stride_ot, stride_oh, TILE, HEAD_DIM, 4, WITH_LSE)

    @gluon.jit
    def hopper_prefill_kernel(q_desc, k_desc, v_desc, O, CU_Q, CU_K, FLAGS, TABLE, LSE,
                              SINK_LOGITS, stride_ot, stride_oh, stride_cq, stride_ck,
                              stride_tb, stride_tc, table_width, total_q, num_seqs, num_heads,
                              tiles, min_q, qk_scale, stride_sk,
                              GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                              STAGES: gl.constexpr, CAUSAL: gl.constexpr, PAGE: gl.constexpr,
                              PAGE_ROWS: gl.constexpr, COMPACT: gl.constexpr,
                              STAGE_OUT: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                              PRODUCER_REGS: gl.constexpr, CONSUMERS: gl.constexpr = 2,
                              PACK: gl.constexpr = 1, SINKS: gl.constexpr = False,
                              WITH_LSE: gl.constexpr = False):
        """Persistent: program p takes items ``p, p + P, ...`` of the ``tiles * (R + 1) * H``
        (hopper_prefill_items); item (g, b, h) is rows ``[T * t, T * t + T)`` of sequence b, head
        h (``T = CONSUMERS * BLOCK_M``), with ``t`` counted from the sequence's last tile.
        ``qk_scale`` = scale * log2(e). ``FLAGS``: int32 ``[tiles, B + 1, H, 2 * (3 -
        CONSUMERS)]``, each written: 1 where one of its rows of the tile (64 with two consumers,
        16 with one) is not finite, else 0.
        ``TABLE``: the block table ``[B, table_width]`` int32 when ``PAGE`` > 0 (else unused);
        ``PAGE_ROWS`` = min(PAGE, BLOCK_N), the rows of the K/V descriptors' blocks. Sequences
        of at most ``min_q`` queries are left alone (0: none). ``COMPACT`` (the launcher sets it
        when ``min_q`` > 0): items only for the other sequences (hopper_prefill_items); without
        it R = B, and the short sequences' items are cheap ones among the others.
        ``STAGE_OUT``: the output stored through a shared-memory tile (a 64-row tile of scratch
        beside the ring). ``PACK`` > 1, the packed form (one consumer; the launcher takes it for
        few queries per sequence: hopper_prefill_forms.packing): an item is a chunk of TOK = 64 /
        PACK tokens of ``PACK`` query heads that share a KV head, rows head-major, so each K/V
        tile is read once for them all (hopper_prefill_items.packed_item); the flags keep the
        one-consumer layout. ``SINKS``: ``SINK_LOGITS`` float32 ``[H]`` (stride ``stride_sk``),
        each head's logit joins its rows' softmax denominator; ``WITH_LSE``: each row's natural
        log of the denominator into ``LSE`` float32 ``[Tq, H]`` (contiguous; ``-inf`` for rows
        that see no key, padding rows included). Unused pointers may be any tensor's."""
        dtype: gl.constexpr = q_desc.dtype
        q_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS, BLOCK_M, HEAD_DIM], q_desc.layout)
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        mbarrier.init(q_empty, count=CONSUMERS)  # each consumer warpgroup releases Q
        for s in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(s), count=1)
            mbarrier.init(v_ready.index(s), count=1)
            mbarrier.init(k_empty.index(s), count=CONSUMERS)  # each consumer releases
            mbarrier.init(v_empty.index(s), count=CONSUMERS)

        # The argument lists are spelled out in each call: built once as tuples (Triton 3.6),
        # they reach the partitions without their constexprs, which then fail to compile.
        if CONSUMERS == 2:
            gl.warp_specialize([
                (_consumer, (q_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, k_empty,
                             v_empty, O, FLAGS, LSE, SINK_LOGITS, CU_Q, CU_K, stride_ot,
                             stride_oh, stride_cq, stride_ck, stride_sk, total_q, num_seqs,
                             num_heads, tiles, min_q, qk_scale, 0, BLOCK_M, BLOCK_N, HEAD_DIM,
                             STAGES, CAUSAL, COMPACT, STAGE_OUT, CONSUMERS, PACK, SINKS,
                             WITH_LSE)),
                (_consumer, (q_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, k_empty,
                             v_empty, O, FLAGS, LSE, SINK_LOGITS, CU_Q, CU_K, stride_ot,
                             stride_oh, stride_cq, stride_ck, stride_sk, total_q, num_seqs,
                             num_heads, tiles, min_q, qk_scale, 1, BLOCK_M, BLOCK_N, HEAD_DIM,
                             STAGES, CAUSAL, COMPACT, STAGE_OUT, CONSUMERS, PACK, SINKS,
                             WITH_LSE)),
                (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, q_empty,
                             k_ready, v_ready, k_empty, v_empty, CU_Q, CU_K, TABLE, stride_cq,
                             stride_ck, stride_tb, stride_tc, table_width, num_seqs, num_heads,
                             tiles, min_q, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES,
                             CAUSAL, PAGE, PAGE_ROWS, COMPACT, CONSUMERS, PACK)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_consumer, (q_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, k_empty,
                             v_empty, O, FLAGS, LSE, SINK_LOGITS, CU_Q, CU_K, stride_ot,
                             stride_oh, stride_cq, stride_ck, stride_sk, total_q, num_seqs,
                             num_heads, tiles, min_q, qk_scale, 0, BLOCK_M, BLOCK_N, HEAD_DIM,
                             STAGES, CAUSAL, COMPACT, STAGE_OUT, CONSUMERS, PACK, SINKS,
                             WITH_LSE)),
                (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, q_empty,
                             k_ready, v_ready, k_empty, v_empty, CU_Q, CU_K, TABLE, stride_cq,
                             stride_ck, stride_tb, stride_tc, table_width, num_seqs, num_heads,
                             tiles, min_q, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES,
                             CAUSAL, PAGE, PAGE_ROWS, COMPACT, CONSUMERS, PACK)),
            ], [1], [PRODUCER_REGS])
