"""Which form of the Gluon Hopper prefill (hopper_prefill_kernel.py) serves a call, from static
facts only: consumer warpgroups per program, the one-consumer form's key step, and the packed form
(the query heads that share a KV head in one item) for few queries per sequence. Each rule with
the measurement behind it; hopper_prefill_launch plans the launch from them.
"""

from __future__ import annotations

# Short causal prompts: one consumer warpgroup per program ("solo": items of 64 rows, a ring of
# 64-key stages) and two programs per SM, so each warpgroup runs its own items and one's softmax
# and epilogue overlap the other's MMAs; two warpgroups on one item wait for each other there, and
# at a few key tiles per item that is most of the item. H200 graph replays, kernel alone, bf16 32/8
# heads, solo vs two consumers (cuDNN beside), us: D 128: 64 x 256 137 vs 160 (125), 96 x U(1, 400)
# 222 vs 249, 32 x 512 198-203 vs 219 (182-187), 128 x 128 107 vs 131 (97), 8 x 384 36 vs 41 (37);
# over a paged prefix (pages of 16, 128 keys more than queries) 64 x 256 203 vs 270, 16 x 128 26 vs
# 38; but 24 x 768 even and 16 x 1024 317-331 vs 296-323, and 4 x 4096 1150 vs 965, where the two
# consumers' shared K/V reads and deeper ring win. D 64, where a K/V tile is half the bytes, it
# wins to 2048 keys: 64 x 256 103 vs 125 (92), 96 x U 168 vs 210, 32 x 512 145 vs 174 (128), 24 x
# 768 206 vs 232 (185), 16 x 1024 221-222 vs 239 (202), 8 x 2048 359-363 vs 375-378 (349-354).
# Non-causal 64 x 256 (D 128): even (176 vs 174), so not taken. Registers: 4 + 1 warps round to 8,
# 128 each for two programs per SM (2 x 256 x 128 = 64 K); the default partition gets what the
# producer leaves (232 beside 24, 224 beside 32). Shared memory: 90 KB at D 128 (Q 16 KB + 2 x (K +
# V) 32 KB + the output's 16 KB tile) of the 113 KB each of two programs may hold.
SOLO_MAX_KEYS = {64: 2048, 128: 512}  # per head dim: the most keys a sequence may have
_SOLO_SHORT_KEYS = 512  # over a paged cache the most keys; past it, D 64's longer key step
# BLOCK_N per head dim, for at most 512 keys and for more (two stages throughout). D 64, 64-key
# steps against 128 (3 stages within 1%): 64 x 256 102.5 vs 107.4 us, 96 x U 168 vs 183, 64 x
# 116 41.9 vs 45.7; past 512 keys 128-key steps: 24 x 768 206 vs 212, 16 x 1024 221 vs 232,
# 8 x 2048 361 vs 408. D 128, 64-key steps against one 128-key stage: 64 x 256 138 vs 155.
_SOLO_BLOCK_N = {64: (64, 128), 128: (64, 64)}
SOLO_MAXNREG = 128

# Few queries per sequence (speculative verification, chunked prefill's short rows): the packed
# form, one consumer, items of TOK = 64 / PACK tokens of PACK query heads that share a KV head,
# head-major rows, so each K/V tile is read once for up to 64 rows of work (unpacked, 64 rows of
# one head: a sequence of 8 queries fills 8 of them). H200 graph replays, bf16 32/8 heads, D
# 128, pages of 16, through the guarded entry (this kernel and the fixup launch), over the
# one-token decode on the same cache, packed vs the unified kernel (BENCHMARKS.md, fourteenth
# pass): 8 queries B 16 x 2048 1.124 vs 1.216, x 8192 1.042 vs 1.139, B 64 x 2048 1.073 vs
# 1.111, x 8192 1.029 vs 1.118; 16 queries 1.035-1.153 vs 1.275-1.309. At 16 rows or fewer
# (4 queries at G = 4) the unified kernel's 16-row tiles are as fast or faster (B 16 x 2048, 1 /
# 2 / 4 queries 1.029 / 1.078 / 1.103 vs 1.106 / 1.113 / 1.122; B 64 x 2048 1.026-1.050 vs
# 1.053-1.066), and the decode kernel serves one query. With fewer items than SMs it loses
# (B 8 x 4096: 1.21-1.51 against 1.03-1.28; the unified kernel splits the keys), so it needs
# about one item per SM (B 15 x 4096, 120 items: 1.035-1.079 vs 1.048-1.692).
PACKED_MIN_ROWS = 16  # packed only past this many rows per sequence (max_seqlen_q * G)
PACKED_MIN_ITEMS_PER_SM = 0.9
# Its (BLOCK_N, STAGES): 128-key steps where the items fit one program per SM (B 16 x 2048:
# 36.3 us vs 37.2-37.7 with 64-key steps of 2 or 4 stages), else 64-key steps at two programs
# per SM (B 64 x 2048: 126.2 vs 129.1 with 128-key steps).
_PACKED_CONFIGS = ((128, 2), (64, 2))


def pack_of(num_heads: int, num_kv_heads: int) -> int:
    """The query heads per packed item: 4 where the group size is a multiple of 4, else 2
    where it is even, else 1 (no packing)."""
    group = num_heads // max(num_kv_heads, 1)
    return 4 if group % 4 == 0 else 2 if group % 2 == 0 else 1


def packing(num_heads: int, num_kv_heads: int, max_seqlen_q: int, num_seqs: int,
            sms: int) -> int:
    """PACK for the packed form (:func:`pack_of`) where it serves the call: every sequence's
    queries in one chunk (``max_seqlen_q <= 64 / PACK``) and more than
    :data:`PACKED_MIN_ROWS` rows, and at least :data:`PACKED_MIN_ITEMS_PER_SM` items per SM;
    else 1."""
    pack = pack_of(num_heads, num_kv_heads)
    rows = int(max_seqlen_q) * (num_heads // max(num_kv_heads, 1))
    if (pack == 1 or int(max_seqlen_q) > 64 // pack or rows <= PACKED_MIN_ROWS
            or num_seqs * num_heads // pack < PACKED_MIN_ITEMS_PER_SM * sms):
        return 1
    return pack


def packed_config(items: int, sms: int) -> tuple[int, int, int]:
    """(BLOCK_N, STAGES, programs per SM) of the packed form for ``items`` real items."""
    block_n, stages = _PACKED_CONFIGS[0] if items <= sms else _PACKED_CONFIGS[1]
    return block_n, stages, 1 if block_n == 128 else 2


def consumers(head_dim: int, causal: bool, max_seqlen_k: int, paged: bool = False) -> int:
    """Consumer warpgroups per program: 1 (two programs per SM, see :data:`SOLO_MAX_KEYS`) for
    causal calls whose sequences have at most that many keys (over a paged cache at most 512,
    where it was measured), else 2."""
    limit = min(SOLO_MAX_KEYS.get(head_dim, 0), _SOLO_SHORT_KEYS if paged else 1 << 31)
    return 1 if causal and int(max_seqlen_k) <= limit else 2


def solo_config(head_dim: int, max_seqlen_k: int) -> tuple[int, int]:
    """(BLOCK_N, STAGES) of the one-consumer form (:data:`_SOLO_BLOCK_N`)."""
    short, longer = _SOLO_BLOCK_N[head_dim]
    return (short if int(max_seqlen_k) <= _SOLO_SHORT_KEYS else longer), 2
