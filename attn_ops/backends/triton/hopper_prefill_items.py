"""The Gluon Hopper prefill's work items (hopper_prefill_kernel.py): their numbering, what item
``w`` is, and which program takes it (the packed form's: :func:`packed_item`).

Items are query tiles of ``TILE`` rows (128, or 64 with one consumer) of one sequence and one head.
Only the R sequences of more than ``min_q`` queries have items (0 but for the split route: shorter
ones are another kernel's, empty ones have no row), numbered ``w = (g * R + r) * H + h`` for the
r-th of them, with g counted from the sequence's last tile (every sequence's longest causal tile
first, and the heads that share a KV head next to each other); then the items of a padding column
``b = B`` (``w = tiles * R * H + g * H + h``: the zeros of the rows past the last sequence). Only
the split route (``COMPACT``) counts R and finds the r-th sequence per item (a scan over
cu_seqlens_q, 32 sequences a step, when R < B); elsewhere R = B: the search code cost dense prompts
3-8% (H200 graph replays, 4 x 4096 1103 vs 1023 us).

A persistent grid of about one program per SM walks them: program p takes items ``p, p + P,
...``, so the programs running at any moment hold neighbouring items, and the four heads of one
KV head read each K/V tile at about the same time (one DRAM read for four). Two ways to balance
the programs' work lost more than the imbalance they removed (a model puts the slowest of 132
programs 15% above the mean at 96 prompts of U(1, 400) tokens, 3% at equal prompts), both on
the H200, graph replays, BENCHMARKS.md:

- contiguous ranges of items of equal estimated cost: 25-35% slower (that sharing lost);
- items drawn in order from a counter by the producer warp and handed to the consumers through
  shared memory (FA3's dynamic scheduler): 0.85-0.99x, also with the draw made an item ahead.
"""

from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    GLUON = True
except Exception:  # noqa: BLE001 - an older Triton, or one whose Gluon API moved: no kernel
    GLUON = False

if GLUON:
    @gluon.jit
    def _add(a, b):
        return a + b

    @gluon.jit
    def real_sequences(CU_Q, stride_cq, num_seqs, min_q, j, NW: gl.constexpr):
        """(the index of sequence ``j`` (from 0) among those of more than ``min_q`` queries, or
        ``num_seqs``; their count): 32 sequences a step, each of the ``NW`` warps holding them
        all (in-warp reductions; the producer's 32 registers leave room for one per thread)."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
        seen = num_seqs * 0
        found = num_seqs
        for c0 in range(0, num_seqs, 32):
            b = c0 + gl.arange(0, 32, layout=layout)
            ok = b < num_seqs
            lo = gl.load(CU_Q + b * stride_cq, mask=ok, other=0)
            hi = gl.load(CU_Q + (b + 1) * stride_cq, mask=ok, other=0)
            real = (ok & (hi - lo > min_q)).to(gl.int32)
            rank = seen + gl.associative_scan(real, 0, _add)
            found = gl.minimum(found, gl.min(gl.where((real > 0) & (rank == j + 1), b, num_seqs),
                                             axis=0))
            seen += gl.sum(real, axis=0)
        return found, seen

    @gluon.jit
    def sequences_with_items(CU_Q, stride_cq, num_seqs, min_q, NW: gl.constexpr,
                              COMPACT: gl.constexpr):
        """R (this module's docstring): B, or with ``COMPACT`` the sequences of more than
        ``min_q`` queries."""
        n_real = num_seqs
        if COMPACT:
            _, n_real = real_sequences(CU_Q, stride_cq, num_seqs, min_q, -1, NW)
        return n_real

    @gluon.jit
    def item(w, CU_Q, CU_K, stride_cq, stride_ck, num_seqs, num_heads, tiles, n_real, min_q,
              TILE: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
              NW: gl.constexpr, COMPACT: gl.constexpr):
        """Item ``w``: (g, seq, head, q_start, lq, m0, k_start, lk, n_iter). ``n_iter`` is the
        count of K/V tiles to walk, 0 when there is nothing to compute: the padding column
        (``seq == num_seqs``), a tile past the sequence's, or one that sees no key. Items
        number the ``n_real`` sequences of more than ``min_q`` queries (this module's docstring)."""
        per_g = gl.maximum(n_real, 1) * num_heads
        pad = w >= tiles * n_real * num_heads
        g = gl.where(pad, (w - tiles * n_real * num_heads) // num_heads, w // per_g)
        seq = (w % per_g) // num_heads
        if COMPACT:
            if n_real < num_seqs:  # some sequences have no item: find the seq-th that has
                seq, _ = real_sequences(CU_Q, stride_cq, num_seqs, min_q, seq, NW)
        seq = gl.where(pad, num_seqs, seq)
        head = w % num_heads  # tiles * n_real * num_heads is a multiple of num_heads
        real = seq < num_seqs
        s = gl.minimum(seq, num_seqs - 1)  # the padding column reads a real sequence's bounds
        q_start = gl.load(CU_Q + s * stride_cq)
        lq = gl.load(CU_Q + (s + 1) * stride_cq) - q_start
        lq = gl.where(real & (lq > min_q), lq, 0)
        k_start = gl.load(CU_K + s * stride_ck)
        lk = gl.load(CU_K + (s + 1) * stride_ck) - k_start
        m0 = (gl.cdiv(lq, TILE) - 1 - g) * TILE
        hi = lk
        if CAUSAL:
            hi = gl.minimum(lk, m0 + TILE + lk - lq)
        n_iter = gl.where(real & (m0 >= 0) & (hi > 0), gl.cdiv(hi, BLOCK_N), 0)
        return g, seq, head, q_start, lq, m0, k_start, lk, n_iter

    @gluon.jit
    def packed_item(w, CU_Q, CU_K, stride_cq, stride_ck, num_seqs, num_heads, tiles,
                    PACK: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
        """Packed item ``w = (c * (B + 1) + b) * (H / PACK) + k`` (hopper_prefill_forms.packing):
        tokens ``c * TOK ..`` (TOK = 64 / PACK) of sequence b, for the query heads ``k * PACK ..
        k * PACK + PACK - 1``, which share a KV head. Chunks count from the sequence's start, so
        every sequence's first chunk (all of a few-query sequence) comes first and those spread
        over the programs. :func:`item`'s tuple, with ``head`` the first head and ``g`` the
        one-consumer flags' 64-row tile of the chunk, counted from the sequence's last tile
        modulo ``tiles``: the chunks past a sequence's tiles take the flag tiles before its
        first, so each of a head's ``tiles * 4`` flags belongs to exactly one item."""
        TOK: gl.constexpr = 64 // PACK
        packs = num_heads // PACK
        c = w // (packs * (num_seqs + 1))
        seq = (w // packs) % (num_seqs + 1)
        real = seq < num_seqs
        s = gl.minimum(seq, num_seqs - 1)  # the padding column reads a real sequence's bounds
        q_start = gl.load(CU_Q + s * stride_cq)
        lq = gl.where(real, gl.load(CU_Q + (s + 1) * stride_cq) - q_start, 0)
        k_start = gl.load(CU_K + s * stride_ck)
        lk = gl.load(CU_K + (s + 1) * stride_ck) - k_start
        m0 = c * TOK
        hi = lk
        if CAUSAL:
            hi = gl.minimum(lk, m0 + TOK + lk - lq)
        n_iter = gl.where(real & (m0 < lq) & (hi > 0), gl.cdiv(hi, BLOCK_N), 0)
        g = (gl.cdiv(lq, 64) - 1 - m0 // 64 + tiles) % tiles
        return g, seq, (w % packs) * PACK, q_start, lq, m0, k_start, lk, n_iter

    @gluon.jit
    def any_item(w, CU_Q, CU_K, stride_cq, stride_ck, num_seqs, num_heads, tiles, n_real,
                 min_q, TILE: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                 NW: gl.constexpr, COMPACT: gl.constexpr, PACK: gl.constexpr):
        """:func:`item`, or with ``PACK`` > 1 :func:`packed_item` (same tuple)."""
        if PACK > 1:
            g, seq, head, q_start, lq, m0, k_start, lk, n_iter = packed_item(
                w, CU_Q, CU_K, stride_cq, stride_ck, num_seqs, num_heads, tiles, PACK, BLOCK_N,
                CAUSAL)
        else:
            g, seq, head, q_start, lq, m0, k_start, lk, n_iter = item(
                w, CU_Q, CU_K, stride_cq, stride_ck, num_seqs, num_heads, tiles, n_real, min_q,
                TILE, BLOCK_N, CAUSAL, NW, COMPACT)
        return g, seq, head, q_start, lq, m0, k_start, lk, n_iter
