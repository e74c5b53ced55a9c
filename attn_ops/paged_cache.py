"""Host-side paged KV cache: allocates the caches and plans the metadata of each batch.

This is the "plan once per batch, run per layer" half of the design: the methods here run on the
host (they may sync and loop over sequences: that is their job), and return small tensors that
every layer's ``store_kvcache`` / ``prefill`` / ``decode`` call reuses with no host decisions.

Example (one layer, two prompts, then one decode step)::

    cache = PagedKVCache(num_blocks=64, block_size=16, num_kv_heads=2, head_dim=64,
                         max_seq_len=256, dtype=torch.float32)
    batch = cache.prepare_prefill({"a": 5, "b": 9})      # seq id -> new token count
    # k, v, q: [14, Hkv, D] / [14, H, D] for the 5 + 9 new tokens
    torch.ops.attn.store_kvcache(k, v, cache.k_cache(0), cache.v_cache(0), batch.slot_mapping)
    out = torch.ops.attn.prefill(q, cache.k_cache(0), cache.v_cache(0), batch.cu_seqlens_q,
                                 batch.cu_seqlens_k, batch.max_seqlen_q, batch.max_seqlen_k,
                                 scale, True, batch.block_table)
    step = cache.prepare_decode(["a", "b"], pad_to=4)   # 4 rows: 2 real, 2 padding

Blocks are reference-counted so :meth:`fork` can share a prefix between sequences; no sequence
ever writes a block another one holds (see :meth:`fork` and :meth:`truncate`).

Every planning call is all-or-nothing: it validates its input and the capacity, computes the
whole plan, and only then changes the bookkeeping, so a call that raises (``CacheFull``,
``KeyError`` for an unknown sequence, ``ValueError`` / ``TypeError`` for a bad count) leaves the
cache exactly as it was and the caller may retry or preempt. ``docs/paged_cache.md`` lists the
API, the guarantee and what each bad input gets.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping

import torch


@dataclass
class PrefillBatch:
    """Metadata of one prefill step over ``B`` sequences and ``T`` new tokens.

    slot_mapping ``[T]`` int64; cu_seqlens_q / cu_seqlens_k ``[B+1]`` int32 (k counts cached +
    new tokens); block_table ``[B, max_blocks_per_seq]`` int32; positions ``[T]`` int64 (token
    index within its sequence, for rotary embeddings); max_seqlen_q / max_seqlen_k host ints.
    """
    seq_ids: list
    slot_mapping: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    block_table: torch.Tensor
    positions: torch.Tensor

    @property
    def is_prefix_free(self) -> bool:
        """True when no sequence had cached tokens: keys are exactly the new tokens."""
        return bool(torch.equal(self.cu_seqlens_q, self.cu_seqlens_k))


@dataclass
class DecodeBatch:
    """Metadata of one decode step: one new token per row, ``B`` rows (padding included).

    slot_mapping ``[B]`` int64 (-1 on padded rows); seqlens_k ``[B]`` int32 (new token counted;
    0 on padded rows); block_table ``[B, max_blocks_per_seq]`` int32; positions ``[B]`` int64.
    """
    seq_ids: list
    slot_mapping: torch.Tensor
    seqlens_k: torch.Tensor
    block_table: torch.Tensor
    positions: torch.Tensor


class CacheFull(RuntimeError):
    """A planning call needs more free blocks than the cache has; it changed nothing.

    Attributes: ``needed`` (free blocks the call would take), ``free`` (free blocks now).
    """

    def __init__(self, message: str, needed: int, free: int):
        super().__init__(message)
        self.needed, self.free = needed, free


@dataclass
class _Growth:
    """One sequence's part of a plan: its block list once the call commits and its new slots."""
    seq_id: Hashable
    start: int                          # tokens it held before the call
    blocks: list[int]                   # its blocks after the call
    slots: list[int]                    # flat slots of its new tokens
    copy: tuple[int, int, int] | None   # (src, dst, tokens): copy-on-write of a shared last block


@dataclass
class _Plan:
    growths: list[_Growth]
    taken: list[int]  # free blocks the call takes, in the order it takes them (-1: none left)


def _count(value, what: str) -> int:
    """``value`` as a non-negative int; bool, float, str and the like raise TypeError."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    try:
        n = operator.index(value)  # int, numpy ints, integer 0-d tensors; not 2.7 or "4"
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r}") from None
    if n < 0:
        raise ValueError(f"{what} must be >= 0, got {n}")
    return n


class PagedKVCache:
    """Paged K/V caches for ``num_layers`` layers plus the block bookkeeping of each sequence.

    Args:
        num_blocks, block_size: the caches are ``[num_blocks, block_size, Hkv, D]`` per layer.
        num_kv_heads, head_dim: Hkv and D.
        max_seq_len: longest sequence; sets the static block-table width
            ``ceil(max_seq_len / block_size)`` (static so a captured graph can replay any batch).
        num_layers: one K and one V cache per layer.
        dtype, device: of the caches; metadata tensors are built on the host and moved to device.
    """

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *,
                 max_seq_len: int, num_layers: int = 1, dtype: torch.dtype = torch.float16,
                 device: torch.device | str = "cpu"):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("max_seq_len", max_seq_len), ("num_layers", num_layers)):
            if _count(value, name) == 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.max_seq_len = max_seq_len
        self.max_blocks_per_seq = -(-max_seq_len // block_size)
        self.device = torch.device(device)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # Random, not zero, initial contents: a kernel that reads an unwritten slot shows up.
        self._k = [torch.randn(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self._v = [torch.randn(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives block 0 first
        self._refs = [0] * num_blocks
        self._blocks: dict[Hashable, list[int]] = {}
        self._lens: dict[Hashable, int] = {}

    # -- caches ---------------------------------------------------------------------------------
    def k_cache(self, layer: int = 0) -> torch.Tensor:
        return self._k[layer]

    def v_cache(self, layer: int = 0) -> torch.Tensor:
        return self._v[layer]

    # -- bookkeeping ----------------------------------------------------------------------------
    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._lens

    def _known(self, seq_id: Hashable, op: str) -> None:
        if seq_id not in self._lens:  # an unhashable id raises TypeError here, before any change
            raise KeyError(f"{op}: unknown sequence {seq_id!r} (never prefilled, or freed)")

    def num_cached(self, seq_id: Hashable) -> int:
        """Tokens of ``seq_id`` whose slots have been handed out (cached or being written)."""
        self._known(seq_id, "num_cached")
        return self._lens[seq_id]

    def blocks(self, seq_id: Hashable) -> list[int]:
        """The blocks of ``seq_id`` in token order (its block-table row, unpadded)."""
        self._known(seq_id, "blocks")
        return list(self._blocks[seq_id])

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, batch: Mapping[Hashable, int] | Iterable[Hashable]) -> int:
        """Free blocks the planning call for ``batch`` would take now (copies on write included).

        ``batch`` is what ``prepare_prefill`` takes (a mapping seq id -> new token count; unknown
        ids are new sequences) or what ``prepare_decode`` takes (an iterable of known ids, one
        token each). Input the call would reject raises the same error here; nothing changes.
        """
        op = "blocks_needed"
        counts = (self._prefill_counts(batch, op) if isinstance(batch, Mapping)
                  else [(s, 1) for s in self._decode_ids(batch, op)])
        return len(self._plan(counts, op).taken)

    def can_allocate(self, batch: Mapping[Hashable, int] | Iterable[Hashable]) -> bool:
        """Whether ``prepare_prefill(batch)`` / ``prepare_decode(batch)`` has the blocks it needs.

        Answers for capacity only: a batch the call would reject for another reason (unknown id,
        bad count, past ``max_seq_len``) raises the same error here.
        """
        return self.blocks_needed(batch) <= len(self._free)

    # -- planning internals: validate and plan with no change, then commit -----------------------
    def _prefill_counts(self, new_tokens, op: str) -> list[tuple[Hashable, int]]:
        if not isinstance(new_tokens, Mapping):
            raise TypeError(f"{op}: new_tokens must map sequence id -> new token count (e.g. a "
                            f"dict), got {type(new_tokens).__name__}")
        return [(s, _count(n, f"{op}: new_tokens[{s!r}]")) for s, n in new_tokens.items()]

    def _decode_ids(self, seq_ids, op: str) -> list:
        if isinstance(seq_ids, (str, bytes)):  # would iterate characters
            raise TypeError(f"{op}: seq_ids must be an iterable of sequence ids, got the "
                            f"string {seq_ids!r} (wrap one id in a list)")
        seq_ids = list(seq_ids)
        for seq_id in seq_ids:
            self._known(seq_id, op)
        if len(set(seq_ids)) != len(seq_ids):
            dup = next(s for i, s in enumerate(seq_ids) if s in seq_ids[:i])
            raise ValueError(f"{op}: sequence {dup!r} appears twice in seq_ids; a decode step "
                             f"advances each sequence by one token")
        return seq_ids

    def _plan(self, counts: list[tuple[Hashable, int]], op: str) -> _Plan:
        """Where each sequence's new tokens go; reads the bookkeeping, never changes it."""
        bs, free = self.block_size, self._free
        taken: list[int] = []

        def take() -> int:  # the blocks free.pop() would give, without popping them
            taken.append(free[len(free) - 1 - len(taken)] if len(taken) < len(free) else -1)
            return taken[-1]

        refs: dict[int, int] = {}  # refcounts this plan has lowered by copying on write
        growths = []
        for seq_id, n in counts:
            start = self._lens.get(seq_id, 0)
            if start + n > self.max_seq_len:
                raise ValueError(f"{op}: sequence {seq_id!r} would hold {start + n} tokens "
                                 f"({start} cached + {n} new), more than max_seq_len="
                                 f"{self.max_seq_len}")
            blocks = self._blocks.get(seq_id, [])
            copy = None
            if n and start % bs:
                last = blocks[-1]
                shared_by = refs.get(last, self._refs[last])
                if shared_by > 1:  # a partial block another sequence holds: copy, then append
                    refs[last] = shared_by - 1
                    blocks = blocks[:-1] + [take()]
                    copy = (last, blocks[-1], start % bs)
            if len(blocks) * bs < start + n:  # copy the list only when it grows (decode: rarely)
                blocks = blocks + [take() for _ in range(-(-(start + n) // bs) - len(blocks))]
            slots = []  # token p goes to blocks[p // bs] * bs + p % bs; one range per block
            end = start + n
            for i in range(start // bs, -(-end // bs)):
                offset = (blocks[i] - i) * bs
                slots.extend(range(offset + max(start, i * bs), offset + min(end, i * bs + bs)))
            growths.append(_Growth(seq_id, start, blocks, slots, copy))
        return _Plan(growths, taken)

    def _check_capacity(self, needed: int, op: str) -> None:
        if needed > len(self._free):
            raise CacheFull(f"{op} needs {needed} free blocks, the paged cache has "
                            f"{len(self._free)} (num_blocks={self.num_blocks}); free or preempt "
                            f"sequences, or allocate more", needed, len(self._free))

    def _copy_block(self, src: int, dst: int, tokens: int) -> None:
        for cache in self._k + self._v:
            cache[dst, :tokens].copy_(cache[src, :tokens])

    def _commit(self, plan: _Plan) -> None:
        # Copies first (into blocks still free), then the bookkeeping, which cannot fail.
        for g in plan.growths:
            if g.copy is not None:
                self._copy_block(*g.copy)
        del self._free[len(self._free) - len(plan.taken):]
        for block in plan.taken:
            self._refs[block] = 1
        for g in plan.growths:
            if g.copy is not None:
                self._refs[g.copy[0]] -= 1  # stays >= 1: the block was shared
            self._blocks[g.seq_id] = g.blocks
            self._lens[g.seq_id] = g.start + len(g.slots)

    def _release(self, blocks: list[int]) -> None:
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)

    # -- sequences ------------------------------------------------------------------------------
    def free(self, seq_id: Hashable) -> int:
        """Forget ``seq_id`` and return its blocks; returns the tokens it held.

        Shared blocks stay while another sequence holds them. Preemption is ``free`` now and
        ``prepare_prefill({seq_id: tokens})`` with the same tokens later (recomputed).
        """
        self._known(seq_id, "free")
        self._release(self._blocks.pop(seq_id))
        return self._lens.pop(seq_id)

    def truncate(self, seq_id: Hashable, n: int) -> None:
        """Drop the last ``n`` tokens of ``seq_id`` (e.g. rejected speculative tokens).

        Blocks that hold none of the remaining tokens are released (returned to the pool when no
        other sequence holds them). Never allocates, so it cannot raise ``CacheFull``. If the new
        last block is partial and shared, the next prefill/decode of ``seq_id`` first copies its
        kept tokens into a fresh block (counted by :meth:`blocks_needed`), so the other holders'
        tokens are never overwritten.
        """
        self._known(seq_id, "truncate")
        n = _count(n, "truncate: n")
        length = self._lens[seq_id]
        if n > length:
            raise ValueError(f"truncate: cannot drop {n} tokens of sequence {seq_id!r}, it holds "
                             f"{length}")
        keep = -(-(length - n) // self.block_size)
        blocks = self._blocks[seq_id]
        self._release(blocks[keep:])
        del blocks[keep:]
        self._lens[seq_id] = length - n

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """Start ``child`` with ``parent``'s cached tokens (prefix reuse, no recomputation).

        Full blocks are shared (reference-counted); the partial last block, if any, is copied
        into a fresh block of the child in every layer, so neither sequence ever writes a block
        the other reads. Takes one free block when ``num_cached(parent) % block_size != 0``.
        """
        self._known(parent, "fork")
        if child in self._lens:
            raise ValueError(f"fork: sequence {child!r} already exists")
        n = self._lens[parent]
        full, tail = divmod(n, self.block_size)
        blocks = self._blocks[parent][:full]
        if tail:
            self._check_capacity(1, f"fork({parent!r}, {child!r})")
            dst = self._free[-1]
            self._copy_block(self._blocks[parent][full], dst, tail)
            self._free.pop()
            self._refs[dst] = 1
        for block in blocks:
            self._refs[block] += 1
        self._blocks[child] = blocks + ([dst] if tail else [])
        self._lens[child] = n

    # -- planning -------------------------------------------------------------------------------
    def _block_table(self, rows: int, growths: list[_Growth]) -> torch.Tensor:
        """``[rows, max_blocks_per_seq]`` int32, zero-padded. One tensor from one nested list:
        256 x 256 took ~8 ms against ~16 ms filled row by row (2-core CPU)."""
        width = self.max_blocks_per_seq
        table = [g.blocks + [0] * (width - len(g.blocks)) for g in growths]
        return torch.tensor(table + [[0] * width] * (rows - len(growths)),
                            dtype=torch.int32).reshape(rows, width)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def prepare_prefill(self, new_tokens: Mapping[Hashable, int]) -> PrefillBatch:
        """Reserve slots for ``new_tokens[seq_id]`` new tokens of each sequence and plan the step.

        A sequence seen before (or forked) keeps its cached tokens as a prefix: its keys are
        cached + new (``cu_seqlens_k``), its queries only the new ones (``cu_seqlens_q``), which
        is what ``attn.prefill`` with ``block_table`` computes after ``store_kvcache``. An unknown
        id starts a new sequence. All or nothing: on error nothing is reserved.
        """
        op = "prepare_prefill"
        plan = self._plan(self._prefill_counts(new_tokens, op), op)
        self._check_capacity(len(plan.taken), op)
        cu_q, cu_k, slots, positions = [0], [0], [], []
        for g in plan.growths:
            n = len(g.slots)
            slots += g.slots
            positions += range(g.start, g.start + n)
            cu_q.append(cu_q[-1] + n)
            cu_k.append(cu_k[-1] + g.start + n)
        batch = PrefillBatch(
            seq_ids=[g.seq_id for g in plan.growths],
            slot_mapping=self._to_device(torch.tensor(slots, dtype=torch.int64)),
            cu_seqlens_q=self._to_device(torch.tensor(cu_q, dtype=torch.int32)),
            cu_seqlens_k=self._to_device(torch.tensor(cu_k, dtype=torch.int32)),
            max_seqlen_q=max((len(g.slots) for g in plan.growths), default=0),
            max_seqlen_k=max((g.start + len(g.slots) for g in plan.growths), default=0),
            block_table=self._to_device(self._block_table(len(plan.growths), plan.growths)),
            positions=self._to_device(torch.tensor(positions, dtype=torch.int64)))
        self._commit(plan)
        return batch

    def prepare_decode(self, seq_ids: Iterable[Hashable], pad_to: int | None = None) -> DecodeBatch:
        """Reserve one slot per sequence for its next token; pad to ``pad_to`` rows if given.

        Padded rows have slot -1 (store skips them), seqlens_k 0 (decode returns zeros) and a
        block-table row of zeros, so a CUDA graph captured at ``pad_to`` rows replays any batch.
        Every id must be known and appear once. All or nothing: on error no sequence advances.
        """
        op = "prepare_decode"
        seq_ids = self._decode_ids(seq_ids, op)
        rows = len(seq_ids) if pad_to is None else _count(pad_to, f"{op}: pad_to")
        if rows < len(seq_ids):
            raise ValueError(f"{op}: pad_to={pad_to} is smaller than the batch of {len(seq_ids)}")
        plan = self._plan([(s, 1) for s in seq_ids], op)
        self._check_capacity(len(plan.taken), op)
        pad = [0] * (rows - len(seq_ids))
        batch = DecodeBatch(
            seq_ids=seq_ids,
            slot_mapping=self._to_device(torch.tensor([g.slots[0] for g in plan.growths]
                                                      + [-1] * len(pad), dtype=torch.int64)),
            seqlens_k=self._to_device(torch.tensor([g.start + 1 for g in plan.growths] + pad,
                                                   dtype=torch.int32)),
            block_table=self._to_device(self._block_table(rows, plan.growths)),
            positions=self._to_device(torch.tensor([g.start for g in plan.growths] + pad,
                                                   dtype=torch.int64)))
        self._commit(plan)
        return batch
