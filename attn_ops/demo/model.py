"""A small Llama-style model with two forward paths that share one set of weights.

* :meth:`DemoLlama.forward` is the plain full-sequence model a user would write: dense
  ``[B, S, ...]`` tensors and ``F.scaled_dot_product_attention(is_causal=True)``. It is what
  ``torch.compile(model, backend="attn_ops")`` rewrites, and the eager oracle of the demo.
* :meth:`DemoLlama.prefill` / :meth:`DemoLlama.decode` serve the same model over a
  :class:`~attn_ops.paged_cache.PagedKVCache`: token-major ``[T, ...]`` tensors, every layer calling
  ``torch.ops.attn.store_kvcache`` and then ``torch.ops.attn.prefill`` (with ``block_table``) or
  ``torch.ops.attn.decode`` with the metadata the cache planned once for the step.

Architecture (Llama): token embedding, ``num_layers`` x [RMSNorm -> GQA attention with rotary
embeddings -> residual, RMSNorm -> SwiGLU MLP -> residual], final RMSNorm, LM head. Weights are
random (``seed``), nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attn_ops.paged_cache import DecodeBatch, PagedKVCache, PrefillBatch


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of :class:`DemoLlama`. The defaults make a ~0.38M-parameter model (CPU-friendly)."""
    vocab_size: int = 320
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, computed in float32; any leading shape."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor):
    """cos, sin ``[..., D/2]`` float32 for int64 ``positions`` of any shape."""
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., N, heads, D]`` by ``cos``/``sin [..., N, D/2]`` (Llama's half split)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    """GQA self-attention: ``num_heads`` query heads share ``num_kv_heads`` key/value heads."""

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_heads, cfg.num_kv_heads,
                                                            cfg.head_dim)
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x ``[..., N, hidden]`` -> q ``[..., N, H, D]``, k and v ``[..., N, Hkv, D]``."""
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Full causal attention: x ``[B, S, hidden]``, cos/sin ``[S, D/2]`` -> ``[B, S,
        hidden]``."""
        b, s, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x, cos, sin))  # [B, heads, S, D]
        # GQA expanded by hand (the Llama idiom): k/v [B, Hkv, S, D] -> [B, H, S, D].
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, -1))

    def forward_paged(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor,
                      batch: PrefillBatch | DecodeBatch) -> torch.Tensor:
        """Token-major attention through the paged cache: x ``[T, hidden]`` -> ``[T, hidden]``.

        The new tokens' K/V are stored first, then a prefill batch attends over each sequence's
        cached prefix plus its new tokens (``block_table``), a decode batch (one row per
        sequence, padded rows have slot -1 and ``seqlens_k`` 0) over its whole cache.
        """
        q, k, v = self._qkv(x, cos, sin)
        torch.ops.attn.store_kvcache(k, v, k_cache, v_cache, batch.slot_mapping)
        if isinstance(batch, PrefillBatch):
            o = torch.ops.attn.prefill(q, k_cache, v_cache, batch.cu_seqlens_q,
                                       batch.cu_seqlens_k, batch.max_seqlen_q,
                                       batch.max_seqlen_k, self.scale, True, batch.block_table)
        else:
            o = torch.ops.attn.decode(q, k_cache, v_cache, batch.seqlens_k, batch.block_table,
                                      self.scale)
        return self.o_proj(o.reshape(x.shape[0], -1))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, any leading shape."""

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attend=None):
        """``attend`` replaces ``self.attn`` (the paged path binds its cache and batch)."""
        h = self.input_norm(x)
        x = x + (attend(h) if attend is not None else self.attn(h, cos, sin))
        return x + self.mlp(self.post_attn_norm(x))


class DemoLlama(nn.Module):
    """The demo model. Weights are drawn from ``torch.Generator().manual_seed(seed)``.

    Args:
        cfg: sizes; see :class:`DemoConfig`.
        seed: fixes every weight, independent of the global RNG.
    """

    def __init__(self, cfg: DemoConfig = DemoConfig(), seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv_freq = cfg.rope_theta ** -(torch.arange(0, cfg.head_dim, 2, dtype=torch.float32)
                                       / cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._init_weights(seed)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        # std = fan_in ** -0.5 keeps activations at unit scale, so attention scores are O(1)
        # (peaked, not uniform: a wrong mask or a stale cache slot changes the tokens) and the
        # logits' top-2 gaps are ~0.1, far above fp32 rounding, so greedy argmax is stable.
        gen = torch.Generator().manual_seed(seed)
        for p in self.parameters():
            if p.dim() == 2:
                fan_in = p.shape[1] if p is not self.embed.weight else 1
                p.copy_(torch.randn(p.shape, generator=gen) * fan_in ** -0.5)
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full recompute: int64 ``input_ids [B, S]`` -> float32 logits ``[B, S, vocab]``."""
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = rotary_cos_sin(pos, self.inv_freq)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x)).float()

    def _forward_paged(self, input_ids: torch.Tensor, cache: PagedKVCache,
                       batch: PrefillBatch | DecodeBatch) -> torch.Tensor:
        """int64 ``input_ids [T]`` at ``batch.positions [T]`` -> final hidden ``[T, hidden]``."""
        cos, sin = rotary_cos_sin(batch.positions, self.inv_freq)
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            def attend(h, i=i, attn=layer.attn):
                return attn.forward_paged(h, cos, sin, cache.k_cache(i), cache.v_cache(i), batch)
            x = layer(x, cos, sin, attend)
        return self.norm(x)

    def prefill(self, input_ids: torch.Tensor, cache: PagedKVCache,
                batch: PrefillBatch) -> torch.Tensor:
        """Process the new tokens of ``batch`` (packed by ``cu_seqlens_q``) and cache their K/V.

        Args:
            input_ids: int64 ``[T]``, the new tokens of every sequence, concatenated.
            cache: the paged cache ``batch`` was planned on (one K/V cache per layer).
            batch: from ``cache.prepare_prefill``; sequences with cached tokens continue them.

        Returns:
            float32 logits ``[B, vocab]`` at each sequence's last new token (every sequence of
            the batch must bring at least one new token).
        """
        h = self._forward_paged(input_ids, cache, batch)
        return self.lm_head(h[batch.cu_seqlens_q[1:].long() - 1]).float()

    def decode(self, input_ids: torch.Tensor, cache: PagedKVCache,
               batch: DecodeBatch) -> torch.Tensor:
        """One token per row: int64 ``input_ids [B]`` -> float32 logits ``[B, vocab]``.

        ``batch`` comes from ``cache.prepare_decode(..., pad_to=B)``; padded rows are computed
        (their attention output is zero) and their logits are meaningless.
        """
        return self.lm_head(self._forward_paged(input_ids, cache, batch)).float()

    def new_cache(self, num_blocks: int, block_size: int, max_seq_len: int,
                  dtype: torch.dtype | None = None) -> PagedKVCache:
        """A :class:`PagedKVCache` with one K/V cache per layer, on this model's device."""
        p = self.lm_head.weight
        return PagedKVCache(num_blocks, block_size, self.cfg.num_kv_heads, self.cfg.head_dim,
                            max_seq_len=max_seq_len, num_layers=self.cfg.num_layers,
                            dtype=dtype or p.dtype, device=p.device)
