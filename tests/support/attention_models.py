"""Small attention modules written the ways models write attention, for the substitution tests.

:class:`SdpaAttention` reaches ``F.scaled_dot_product_attention`` (GQA and mask spelled several
ways), :class:`HandAttention` writes ``softmax(q k^T) v`` by hand in one model family's style.
Both map x ``[B, S, 64]`` through their own projections, so every test has real weights.
"""

import math

import torch
import torch.nn.functional as F


class SdpaAttention(torch.nn.Module):
    """x ``[B, S, 64]`` -> ``[B, S, H * D]`` through one SDPA call written one of several ways.

    gqa: "sdpa" (enable_gqa=True), "repeat_kv", "repeat_interleave", or "none" (H == Hkv).
    mask: None (is_causal=causal), "tril", "triu_inf", "arange", "input" (a forward argument),
    "window" (sliding window: 3 keys back), "window_with_a_hole" (hides the diagonal too: not
    the op's window), "padding" (key padding from a lengths argument), "truncated"
    (``(tril + 0.5).long().bool()``: causal once the cast truncates), "fp32_tie"
    (``tril * 0.1 + 0.2 > 0.3``: all False in fp32, where 0.1 + 0.2 rounds to 0.3).
    """

    def __init__(self, h=4, hkv=2, d=16, gqa="repeat_kv", mask=None, causal=True, dropout=0.0,
                 scale=None, kv_len=None, q_len=None):
        super().__init__()
        self.h, self.hkv, self.d = h, hkv, d
        self.gqa, self.mask, self.causal = gqa, mask, causal
        self.dropout, self.scale = dropout, scale
        self.kv_len, self.q_len = kv_len, q_len
        self.q = torch.nn.Linear(64, h * d)
        self.kv = torch.nn.Linear(64, 2 * hkv * d)

    def forward(self, x, extra=None):
        b, s, _ = x.shape
        if self.q_len is not None:
            s = self.q_len
        q = self.q(x[:, x.shape[1] - s:]).view(b, s, self.h, self.d).transpose(1, 2)
        src = x if self.kv_len is None else x[:, :self.kv_len]
        sk = src.shape[1]
        k, v = self.kv(src).view(b, sk, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4)
        n = self.h // self.hkv
        if self.gqa == "repeat_kv":
            k = k[:, :, None].expand(b, self.hkv, n, sk, self.d).reshape(b, self.h, sk, self.d)
            v = v[:, :, None].expand(b, self.hkv, n, sk, self.d).reshape(b, self.h, sk, self.d)
        elif self.gqa == "repeat_interleave":
            k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
        kw = dict(dropout_p=self.dropout, scale=self.scale, enable_gqa=self.gqa == "sdpa")
        mask = self._mask(x, s, sk, extra)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, **kw)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)

    def _mask(self, x, s, sk, extra):
        if self.mask in ("arange", "window", "window_with_a_hole", "padding"):
            pos_q, pos_k = torch.arange(s, device=x.device), torch.arange(sk, device=x.device)
        if self.mask == "tril":
            return torch.ones(s, sk, dtype=torch.bool, device=x.device).tril()
        if self.mask == "triu_inf":
            return torch.full((s, sk), -math.inf, device=x.device, dtype=x.dtype).triu(1)
        if self.mask == "arange":
            return (pos_k[None, :] <= pos_q[:, None])[None, None]
        if self.mask == "truncated":
            return (torch.ones(s, sk, device=x.device).tril() + 0.5).long().bool()
        if self.mask == "fp32_tie":
            return (torch.ones(s, sk, device=x.device).tril() * 0.1 + 0.2) > 0.3
        if self.mask == "input":
            return extra
        if self.mask == "window":
            return (pos_k[None, :] <= pos_q[:, None]) & (pos_q[:, None] - pos_k[None, :] < 4)
        if self.mask == "window_with_a_hole":  # hides the diagonal too: no band of the op's
            return (pos_k[None, :] < pos_q[:, None]) & (pos_q[:, None] - pos_k[None, :] < 4)
        if self.mask == "padding":
            return (pos_k[None, :] < extra[:, None])[:, None, None, :]
        return None


class HandAttention(torch.nn.Module):
    """x ``[B, S, 64]`` -> ``[B, H, S, D]`` through softmax(q k^T) v written in one model's style.

    style: "hf" (HF eager: ``* scaling + mask``, fp32 softmax, dropout), "llama" (``/ sqrt(d)``,
    ``+ triu(-inf)``, ``softmax(s.float()).type_as(q)``), "nanogpt" (``masked_fill(tril == 0,
    -inf)``), "where" (``torch.where(tril, s, -inf)``).
    mask: "graph" (built in forward from positions), "buffer" (a registered tril buffer),
    "input" (a forward argument), "window" (sliding window), None (no mask: not causal).
    """

    def __init__(self, h=4, hkv=2, d=16, style="hf", gqa="repeat_kv", mask="graph", dropout=0.0):
        super().__init__()
        self.h, self.hkv, self.d, self.style, self.gqa = h, hkv, d, style, gqa
        self.mask_kind, self.dropout = mask, dropout
        self.q = torch.nn.Linear(64, h * d)
        self.kv = torch.nn.Linear(64, 2 * hkv * d)
        self.register_buffer("tril", torch.ones(64, 64, dtype=torch.bool).tril())

    def _keep(self, x, s, extra):
        """Bool ``[S, S]``, True where query i may see key j."""
        if self.mask_kind == "buffer":
            return self.tril[:s, :s]
        if self.mask_kind == "input":
            return extra
        pos = torch.arange(s, device=x.device)
        keep = pos[None, :] <= pos[:, None]
        if self.mask_kind == "window":
            keep = keep & (pos[:, None] - pos[None, :] < 3)
        return keep

    def forward(self, x, extra=None):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4)
        n = self.h // self.hkv
        if self.gqa == "repeat_kv":
            k = k[:, :, None].expand(b, self.hkv, n, s, self.d).reshape(b, self.h, s, self.d)
            v = v[:, :, None].expand(b, self.hkv, n, s, self.d).reshape(b, self.h, s, self.d)
        elif self.gqa == "repeat_interleave":
            k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
        keep = None if self.mask_kind is None else self._keep(x, s, extra)
        if self.style == "hf":
            w = torch.matmul(q, k.transpose(2, 3)) * self.d ** -0.5
            if keep is not None:
                w = w + torch.where(keep, 0.0, torch.finfo(x.dtype).min).to(x.dtype)
            w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            w = F.dropout(w, p=self.dropout, training=self.training)
            return torch.matmul(w, v)
        if self.style == "llama":
            w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.d)
            if keep is not None:
                w = w + torch.full((s, s), float("-inf"), device=x.device).triu(1).to(x.dtype)
            return torch.matmul(F.softmax(w.float(), dim=-1).type_as(q), v)
        w = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d))
        if keep is not None and self.style == "nanogpt":
            w = w.masked_fill(keep == 0, float("-inf"))
        elif keep is not None:
            w = torch.where(keep, w, float("-inf"))
        return F.softmax(w, dim=-1) @ v


class CacheAttention(torch.nn.Module):
    """gpt-fast-style attention over a static KV cache: x ``[B, S, 64]`` at positions
    ``input_pos [S]`` -> ``[B, S, H * D]``.

    The step writes its K/V at ``input_pos`` (``cache[:, input_pos] = k``) and attends over the
    whole cache with a mask that hides keys past each query's position. Unwritten cache slots
    hold random values (never zero), so a substitution that reads past the position is seen.

    layout: "token_major" (caches ``[B, S_max, Hkv, D]``, read through ``.transpose(1, 2)``) or
    "heads_major" (gpt-fast's ``[B, Hkv, S_max, D]``).
    gqa: "repeat_interleave" (gpt-fast), "repeat_kv" (expand + reshape) or "sdpa"
    (``enable_gqa=True``; SDPA only).
    attention: "sdpa", or by hand: "hf" (HF eager: ``* scaling``, ``+ where(keep, 0, min)``,
    fp32 softmax), "llama" (``/ sqrt(d)``, ``+ where(keep, 0, -inf)``,
    ``softmax(s.float()).type_as(q)``), "masked_fill" (``masked_fill(~keep, -inf)``), "where"
    (``torch.where(keep, s, -inf)``). softcap: Gemma2's ``tanh(s / c) * c`` before the mask
    (by hand only).
    mask: "indexed_tril" (``tril(ones)[None, None, input_pos]`` built in the graph), "arange"
    (``arange(S_max) <= input_pos[:, None]``), "additive" (0 / dtype-min from the same),
    "additive_inf" (``zeros.masked_fill(~keep, -inf)``), "where_inf" (``where(keep, 0, -inf)``),
    "buffer" (gpt-fast's ``causal_mask`` tensor attribute: its data could be anything),
    "window" (also hides keys more than 3 positions back: a sliding window, window_left 3).
    Not "key j iff j <= pos": "window_off_by_one" (hides the key at the position too),
    "one_past" (also sees the slot after the position, not written yet), "random_buffer"
    (``& key_mask``, a random bool buffer ``[B, S_max]``), "lengths" (``& (j < lengths[b])``,
    ``lengths`` a third forward argument: data other than the positions).
    """

    def __init__(self, h=4, hkv=2, d=16, s_max=24, batch=2, layout="token_major",
                 gqa="repeat_interleave", mask="indexed_tril", attention="sdpa", softcap=None):
        super().__init__()
        self.h, self.hkv, self.d, self.s_max = h, hkv, d, s_max
        self.layout, self.gqa, self.mask = layout, gqa, mask
        self.attention, self.softcap = attention, softcap
        self.q = torch.nn.Linear(64, h * d)
        self.kv = torch.nn.Linear(64, 2 * hkv * d)
        shape = (batch, s_max, hkv, d) if layout == "token_major" else (batch, hkv, s_max, d)
        self.register_buffer("k_cache", torch.randn(shape))
        self.register_buffer("v_cache", torch.randn(shape))
        self.register_buffer("causal_mask", torch.ones(s_max, s_max, dtype=torch.bool).tril())
        self.register_buffer("key_mask", torch.rand(batch, s_max) < 0.8)

    def forward(self, x, input_pos, lengths=None):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.hkv, self.d).unbind(2)
        if self.layout == "token_major":
            self.k_cache[:, input_pos] = k
            self.v_cache[:, input_pos] = v
            k, v = self.k_cache.transpose(1, 2), self.v_cache.transpose(1, 2)
        else:
            self.k_cache[:, :, input_pos] = k.transpose(1, 2)
            self.v_cache[:, :, input_pos] = v.transpose(1, 2)
            k, v = self.k_cache, self.v_cache
        n = self.h // self.hkv
        if self.gqa == "repeat_interleave":
            k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
        elif self.gqa == "repeat_kv":
            k, v = (t[:, :, None].expand(b, self.hkv, n, self.s_max, self.d)
                    .reshape(b, self.h, self.s_max, self.d) for t in (k, v))
        mask = self._mask(x, input_pos, lengths)
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               enable_gqa=self.gqa == "sdpa")
        else:
            y = self._by_hand(q, k, v, mask)
        return y.transpose(1, 2).reshape(b, s, self.h * self.d)

    def _by_hand(self, q, k, v, mask):
        if self.attention == "llama":
            w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.d)
        else:
            w = torch.matmul(q, k.transpose(-2, -1)) * self.d ** -0.5
        if self.softcap is not None:
            w = w / self.softcap
            w = torch.tanh(w)
            w = w * self.softcap
        if self.attention == "masked_fill":
            return F.softmax(w.masked_fill(~mask, float("-inf")), dim=-1) @ v
        if self.attention == "where":
            return F.softmax(torch.where(mask, w, float("-inf")), dim=-1) @ v
        if mask.dtype == torch.bool:
            hide = torch.finfo(w.dtype).min if self.attention == "hf" else float("-inf")
            mask = torch.where(mask, 0.0, hide).to(w.dtype)
        if self.attention == "hf":
            return torch.matmul(F.softmax(w + mask, dim=-1, dtype=torch.float32).to(q.dtype), v)
        return torch.matmul(F.softmax((w + mask).float(), dim=-1).type_as(q), v)

    def _mask(self, x, input_pos, lengths=None):
        if self.mask == "buffer":
            return self.causal_mask[None, None, input_pos]
        if self.mask == "indexed_tril":
            tril = torch.ones(self.s_max, self.s_max, dtype=torch.bool, device=x.device).tril()
            return tril[None, None, input_pos]
        keys = torch.arange(self.s_max, device=x.device)
        keep = keys[None, :] <= input_pos[:, None]
        if self.mask == "additive":
            return torch.where(keep, 0.0, torch.finfo(x.dtype).min).to(x.dtype)
        if self.mask == "additive_inf":
            return torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(
                ~keep, float("-inf"))
        if self.mask == "where_inf":
            return torch.where(keep, 0.0, float("-inf")).to(x.dtype)
        back = input_pos[:, None] - keys
        if self.mask == "window":
            return keep & (back < 4)
        if self.mask == "window_off_by_one":
            return keep & (back < 4) & (back > 0)
        if self.mask == "one_past":
            return keys[None, :] <= input_pos[:, None] + 1
        if self.mask == "random_buffer":
            return keep[None, None] & self.key_mask[:, None, None, :]
        if self.mask == "lengths":
            return keep[None, None] & (keys < lengths[:, None])[:, None, None, :]
        return keep


class TinyGptFast(torch.nn.Module):
    """Embedding, a stack of :class:`CacheAttention` layers with residuals, tied head: enough
    of gpt-fast for a greedy generate loop over a static cache. ``layers``: one dict of
    :class:`CacheAttention` arguments per layer (else ``n`` layers of ``kw``)."""

    def __init__(self, n=2, vocab=97, layers=None, **kw):
        super().__init__()
        layers = layers or [kw] * n
        self.embed = torch.nn.Embedding(vocab, 64)
        self.layers = torch.nn.ModuleList(CacheAttention(batch=1, **{**kw, **layer})
                                          for layer in layers)
        self.out = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in layers)

    def forward(self, ids, input_pos):
        x = self.embed(ids)
        for attn, out in zip(self.layers, self.out):
            x = x + out(attn(x, input_pos))
        return x @ self.embed.weight.T
