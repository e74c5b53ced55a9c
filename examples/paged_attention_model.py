"""A small attention layer whose paged KV cache lives in module buffers, for export and capture.

The layer calls ``torch.ops.attn.*`` directly (no Python wrapper, no global context), so every
input the ops read is an argument of ``forward`` or a buffer: ``torch.export`` sees all of them,
and a CUDA graph captured once replays with new lengths, block tables and slots.

Two steps wrap the one layer, because ``torch.export`` exports ``forward``:

* :class:`PrefillStep`: ``store_kvcache`` of the new tokens, then paged ``prefill`` (prefix
  caching: the keys of sequence b are its first ``cu_seqlens_k[b+1] - cu_seqlens_k[b]`` cached
  tokens, the new ones included).
* :class:`DecodeStep`: ``store_kvcache`` of one token per sequence, then ``decode``.

The ``max_seqlen_*`` bounds the ops need are read from shapes, never from data: the token count
``T`` bounds every query length and ``block_table.shape[1] * block_size`` bounds every key length.
With ``T`` and the table width dynamic (``torch.export.Dim``) nothing is frozen into the program.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

import attn_ops  # noqa: F401  (registers torch.ops.attn.*)

if TYPE_CHECKING:
    from attn_ops import DecodeBatch, PrefillBatch


@dataclass(frozen=True)
class LayerConfig:
    """Shapes of :class:`PagedAttention`. Head dims must be multiples of 8 (the op contract)."""
    hidden: int = 32
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    num_blocks: int = 16
    block_size: int = 4
    dtype: torch.dtype = torch.float32


class PagedAttention(nn.Module):
    """Q/K/V/O projections around the attn ops; caches are buffers ``[num_blocks, block_size,
    Hkv, D]``, written in place by ``torch.ops.attn.store_kvcache``.

    Buffers rather than inputs, because that is how a served model owns its cache: the exported
    program lists them as mutated buffers, and an AOTInductor package or a CUDA graph writes the
    very same storage every step (no copy in, no copy out).
    """

    def __init__(self, cfg: LayerConfig = LayerConfig(), k_cache: torch.Tensor | None = None,
                 v_cache: torch.Tensor | None = None):
        super().__init__()
        h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if h % hkv:
            raise ValueError(f"num_heads ({h}) must be a multiple of num_kv_heads ({hkv})")
        self.cfg = cfg
        self.scale = d ** -0.5
        kw = dict(bias=False, dtype=cfg.dtype)
        self.q_proj = nn.Linear(cfg.hidden, h * d, **kw)
        self.k_proj = nn.Linear(cfg.hidden, hkv * d, **kw)
        self.v_proj = nn.Linear(cfg.hidden, hkv * d, **kw)
        self.o_proj = nn.Linear(h * d, cfg.hidden, **kw)
        shape = (cfg.num_blocks, cfg.block_size, hkv, d)
        # Given caches (e.g. a PagedKVCache's) are used as they are, not copied. Fresh ones are
        # random, not zero: a step that reads a slot it never wrote gives a visibly wrong answer.
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if cache is None:
                cache = torch.randn(shape, dtype=cfg.dtype)
            elif tuple(cache.shape) != shape or cache.dtype != cfg.dtype:
                raise ValueError(f"{name}: expected shape {list(shape)} [num_blocks, block_size, "
                                 f"Hkv, D] of dtype {cfg.dtype}, got {list(cache.shape)} "
                                 f"{cache.dtype}")
            self.register_buffer(name, cache)

    def _qkv(self, x: torch.Tensor):
        """x ``[T, hidden]`` -> q ``[T, H, D]``, k and v ``[T, Hkv, D]``."""
        cfg = self.cfg
        q = self.q_proj(x).view(-1, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).view(-1, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).view(-1, cfg.num_kv_heads, cfg.head_dim)
        return q, k, v

    def prefill(self, x: torch.Tensor, slot_mapping: torch.Tensor, cu_seqlens_q: torch.Tensor,
                cu_seqlens_k: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        """Store the new tokens, then attend over each sequence's cached prefix + new tokens.

        Args:
            x: ``[T, hidden]`` the new tokens of all sequences, packed.
            slot_mapping: ``[T]`` int64 flat cache slot of each token, ``-1`` skips it.
            cu_seqlens_q: ``[B+1]`` int32 cumulative new-token counts.
            cu_seqlens_k: ``[B+1]`` int32 cumulative cached-token counts (new ones included).
            block_table: ``[B, W]`` int32 cache blocks of each sequence.

        Returns:
            ``[T, hidden]``.
        """
        q, k, v = self._qkv(x)
        torch.ops.attn.store_kvcache(k, v, self.k_cache, self.v_cache, slot_mapping)
        max_q = x.shape[0]
        max_k = block_table.shape[1] * self.cfg.block_size
        o = torch.ops.attn.prefill(q, self.k_cache, self.v_cache, cu_seqlens_q, cu_seqlens_k,
                                   max_q, max_k, self.scale, True, block_table)
        return self.o_proj(o.flatten(1))

    def decode(self, x: torch.Tensor, slot_mapping: torch.Tensor, seqlens_k: torch.Tensor,
               block_table: torch.Tensor) -> torch.Tensor:
        """Store one token per sequence, then attend over its cached tokens.

        Args:
            x: ``[B, hidden]`` one new token per sequence (padded rows allowed).
            slot_mapping: ``[B]`` int64, ``-1`` for padded rows.
            seqlens_k: ``[B]`` int32 cached tokens per sequence, the new one included; 0 pads.
            block_table: ``[B, W]`` int32.

        Returns:
            ``[B, hidden]``; padded rows are ``o_proj(0) = 0``.
        """
        q, k, v = self._qkv(x)
        torch.ops.attn.store_kvcache(k, v, self.k_cache, self.v_cache, slot_mapping)
        o = torch.ops.attn.decode(q, self.k_cache, self.v_cache, seqlens_k, block_table,
                                  self.scale)
        return self.o_proj(o.flatten(1))


class PrefillStep(nn.Module):
    """``forward`` = :meth:`PagedAttention.prefill`; the caches are buffers ``layer.k_cache``..."""

    def __init__(self, layer: PagedAttention):
        super().__init__()
        self.layer = layer

    def forward(self, x, slot_mapping, cu_seqlens_q, cu_seqlens_k, block_table):
        return self.layer.prefill(x, slot_mapping, cu_seqlens_q, cu_seqlens_k, block_table)


class DecodeStep(nn.Module):
    """``forward`` = :meth:`PagedAttention.decode`."""

    def __init__(self, layer: PagedAttention):
        super().__init__()
        self.layer = layer

    def forward(self, x, slot_mapping, seqlens_k, block_table):
        return self.layer.decode(x, slot_mapping, seqlens_k, block_table)


def dynamic_shapes(step: nn.Module) -> dict:
    """``torch.export`` dynamic shapes: token count, batch and block-table width all vary.

    Prefill: ``T`` tokens and ``B`` sequences (``cu_seqlens`` have ``B + 1`` rows). Decode: ``B``
    rows. The program then runs any size in ``[1, max]``, but the example inputs given to
    ``torch.export`` must have sizes >= 2: torch specialises a dim whose example size is 0 or 1.
    """
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    width = Dim("blocks_per_seq", min=1, max=4096)
    if isinstance(step, PrefillStep):
        tokens = Dim("tokens", min=1, max=65536)
        return {"x": {0: tokens}, "slot_mapping": {0: tokens}, "cu_seqlens_q": {0: batch + 1},
                "cu_seqlens_k": {0: batch + 1}, "block_table": {0: batch, 1: width}}
    return {"x": {0: batch}, "slot_mapping": {0: batch}, "seqlens_k": {0: batch},
            "block_table": {0: batch, 1: width}}


def prefill_inputs(batch: PrefillBatch, x: torch.Tensor) -> tuple:
    """The positional arguments of :class:`PrefillStep` for a planned batch and its tokens."""
    return (x, batch.slot_mapping, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.block_table)


def decode_inputs(batch: DecodeBatch, x: torch.Tensor) -> tuple:
    """The positional arguments of :class:`DecodeStep` for a planned batch and its tokens."""
    return (x, batch.slot_mapping, batch.seqlens_k, batch.block_table)


def bind_aoti_caches(package, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     prefix: str = "layer.") -> None:
    """Make a loaded AOTInductor package read and write these cache tensors, without a copy.

    A package embeds the buffers it was exported with, and each package has its own copy: the
    prefill and decode packages of one model would not see each other's writes. Binding the
    same tensors into both (``user_managed=True``: the package keeps the pointers) makes them
    share the server's cache. The caller keeps the tensors alive and their shape and dtype must
    be the exported ones.

    Args:
        package: what ``torch._inductor.aoti_load_package`` returned.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]`` on the package's device.
        prefix: the buffers' module path (``"layer."`` for :class:`PrefillStep` /
            :class:`DecodeStep`).
    """
    import inspect

    if "user_managed" not in inspect.signature(package.load_constants).parameters:
        raise RuntimeError("this torch's AOTICompiledModel.load_constants has no user_managed "
                           "argument: binding caches without a copy needs a newer torch")
    package.load_constants({prefix + "k_cache": k_cache, prefix + "v_cache": v_cache},
                           check_full_update=False, user_managed=True)
