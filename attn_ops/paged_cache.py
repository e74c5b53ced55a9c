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

Blocks are reference-counted so :meth:`fork` can share a prefix between sequences (full blocks
are shared; the partial last block is copied, so appends never write a shared block).
"""

from __future__ import annotations

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
    """No free block is left for a sequence that needs one."""


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
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, "
                             f"{block_size}")
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
        return seq_id in self._blocks

    def num_cached(self, seq_id: Hashable) -> int:
        """Tokens of ``seq_id`` whose slots have been handed out (cached or being written)."""
        return self._lens[seq_id]

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks(self, seq_id: Hashable) -> list[int]:
        return list(self._blocks[seq_id])

    def _take_block(self) -> int:
        if not self._free:
            raise CacheFull(f"the paged cache has no free block left (num_blocks="
                            f"{self.num_blocks}); free finished sequences or allocate more")
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)

    def _reserve(self, seq_id: Hashable, n: int) -> list[int]:
        """Hand out the next ``n`` slots of ``seq_id`` (new blocks as needed); return them."""
        blocks = self._blocks.setdefault(seq_id, [])
        start = self._lens.setdefault(seq_id, 0)
        if start + n > self.max_seq_len:
            raise ValueError(f"sequence {seq_id!r} would hold {start + n} tokens, more than "
                             f"max_seq_len={self.max_seq_len}")
        slots = []
        for pos in range(start, start + n):
            if pos // self.block_size == len(blocks):
                blocks.append(self._take_block())
            slots.append(blocks[pos // self.block_size] * self.block_size + pos % self.block_size)
        self._lens[seq_id] = start + n
        return slots

    def free(self, seq_id: Hashable) -> None:
        """Return the blocks of a finished sequence (shared blocks stay while others use them)."""
        for block in self._blocks.pop(seq_id):
            self._release(block)
        del self._lens[seq_id]

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """Start ``child`` with ``parent``'s cached tokens (prefix reuse, no recomputation).

        Full blocks are shared (reference-counted); the partial last block, if any, is copied
        into a fresh block of the child in every layer, so neither sequence ever writes a block
        the other reads.
        """
        if child in self._blocks:
            raise ValueError(f"fork: sequence {child!r} already exists")
        n = self._lens[parent]
        full, tail = divmod(n, self.block_size)
        shared = self._blocks[parent][:full]
        for block in shared:
            self._refs[block] += 1
        blocks = list(shared)
        if tail:
            src = self._blocks[parent][full]
            dst = self._take_block()
            for cache in self._k + self._v:
                cache[dst, :tail].copy_(cache[src, :tail])
            blocks.append(dst)
        self._blocks[child] = blocks
        self._lens[child] = n

    # -- planning -------------------------------------------------------------------------------
    def _block_table(self, seq_ids: list, rows: int) -> torch.Tensor:
        table = torch.zeros(rows, self.max_blocks_per_seq, dtype=torch.int32)
        for i, seq_id in enumerate(seq_ids):
            blocks = self._blocks[seq_id]
            table[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return table

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def prepare_prefill(self, new_tokens: Mapping[Hashable, int]) -> PrefillBatch:
        """Reserve slots for ``new_tokens[seq_id]`` new tokens of each sequence and plan the step.

        A sequence seen before (or forked) keeps its cached tokens as a prefix: its keys are
        cached + new (``cu_seqlens_k``), its queries only the new ones (``cu_seqlens_q``), which
        is what ``attn.prefill`` with ``block_table`` computes after ``store_kvcache``.
        """
        seq_ids = list(new_tokens)
        cu_q, cu_k, slots, positions = [0], [0], [], []
        for seq_id in seq_ids:
            n = int(new_tokens[seq_id])
            start = self._lens.get(seq_id, 0)
            slots += self._reserve(seq_id, n)
            positions += range(start, start + n)
            cu_q.append(cu_q[-1] + n)
            cu_k.append(cu_k[-1] + start + n)
        lq = [b - a for a, b in zip(cu_q, cu_q[1:])]
        lk = [b - a for a, b in zip(cu_k, cu_k[1:])]
        return PrefillBatch(
            seq_ids=seq_ids,
            slot_mapping=self._to_device(torch.tensor(slots, dtype=torch.int64)),
            cu_seqlens_q=self._to_device(torch.tensor(cu_q, dtype=torch.int32)),
            cu_seqlens_k=self._to_device(torch.tensor(cu_k, dtype=torch.int32)),
            max_seqlen_q=max(lq, default=0), max_seqlen_k=max(lk, default=0),
            block_table=self._to_device(self._block_table(seq_ids, len(seq_ids))),
            positions=self._to_device(torch.tensor(positions, dtype=torch.int64)))

    def prepare_decode(self, seq_ids: Iterable[Hashable], pad_to: int | None = None) -> DecodeBatch:
        """Reserve one slot per sequence for its next token; pad to ``pad_to`` rows if given.

        Padded rows have slot -1 (store skips them), seqlens_k 0 (decode returns zeros) and a
        block-table row of zeros, so a CUDA graph captured at ``pad_to`` rows replays any batch.
        """
        seq_ids = list(seq_ids)
        rows = len(seq_ids) if pad_to is None else pad_to
        if rows < len(seq_ids):
            raise ValueError(f"pad_to={pad_to} is smaller than the batch of {len(seq_ids)}")
        slots = [-1] * rows
        lens = [0] * rows
        positions = [0] * rows
        for i, seq_id in enumerate(seq_ids):
            positions[i] = self._lens[seq_id]
            slots[i] = self._reserve(seq_id, 1)[0]
            lens[i] = self._lens[seq_id]
        return DecodeBatch(
            seq_ids=seq_ids,
            slot_mapping=self._to_device(torch.tensor(slots, dtype=torch.int64)),
            seqlens_k=self._to_device(torch.tensor(lens, dtype=torch.int32)),
            block_table=self._to_device(self._block_table(seq_ids, rows)),
            positions=self._to_device(torch.tensor(positions, dtype=torch.int64)))
