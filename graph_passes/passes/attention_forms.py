"""Hand-written attention forms, as eager code: the table the pattern pass traces and matches.

Each entry is a search function (the attention as models write it) and its replacement
(:func:`graph_passes.rewrite.dense_prefill.dense_prefill`), generated over the axes models vary
along:

* scale: ``(q @ k^T) * scale`` (HF eager, nanoGPT) or ``(q @ k^T) / inv_scale``
  (``/ math.sqrt(d)``, Meta's llama);
* mask: none (non-causal), additive ``+ mask`` (HF eager: 0 / dtype-min), ``masked_fill(m, -inf)``
  (True = hidden) or ``torch.where(m, s, -inf)`` (True = kept);
* softmax: "plain", "fp32" (``softmax(s, -1, dtype=float32).to(q.dtype)``) or "cast"
  (``softmax(s.float(), -1).type_as(q)``; after Inductor's decompositions it is the same graph
  as "fp32", so only export's IR needs it);
* GQA: K/V repeated by ``repeat_kv`` / ``repeat_interleave`` before the matmuls (the replacement
  reads the Hkv heads directly) or not.

A mask form only matches when :mod:`graph_passes.mask.causal_mask` proves the mask causal
(checked by the pass), so its replacement is causal; the mask-free forms are not causal.

The same forms over a static KV cache (``cache=True``: the mask proven "key j iff j <= pos[i]",
see :mod:`.handwritten_over_cache`) are replaced by :func:`attention_over_cache`, a placeholder
op that the pass turns into ``attn.decode`` / a paged ``attn.prefill`` once it knows the
positions (they are not an argument of the pattern: the mask is built from them). Those forms
also come soft-capped (Gemma2: ``s = tanh(s / c) * c`` between the scale and the mask, the
op's ``softcap`` argument).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch

from graph_passes.rewrite.dense_prefill import dense_prefill

SCALE_OPS = ("mul", "div")
MASK_OPS = (None, "add", "masked_fill", "where")
# How each mask form reads its mask, in causal_mask.classify's terms.
MASK_USAGE = {"add": "additive", "masked_fill": "masked", "where": "keep"}
SCALE_MAGIC = 0.2871  # a literal no model uses: lets the tracer recover the scale argument
SOFTCAP_MAGIC = 0.3719  # the same for the softcap constant


@torch.library.custom_op("graph_passes::attention_over_cache", mutates_args=())
def attention_over_cache(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_mask: torch.Tensor, scale: float, softcap: float,
                         mask_op: str) -> torch.Tensor:
    """Hand-written attention over a cache, as matched: a placeholder in the graph until the
    pass emits the op (:func:`graph_passes.passes.handwritten_over_cache.emit_cache_sites`).

    q ``[B, H, Sq, D]``, k/v ``[B, Hkv, S, D]`` (query head h reads kv head ``h // (H // Hkv)``),
    ``scale`` multiplies q·k, ``softcap`` > 0 caps the scores (0: none), ``attn_mask`` is used
    as ``mask_op`` does. Should one ever run, it computes the attention as written (in fp32).
    """
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    s = torch.matmul(query.float(), key.float().transpose(-2, -1)) * scale
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    p = torch.softmax(_apply_mask(s, attn_mask, mask_op), dim=-1)
    return torch.matmul(p, value.float()).to(query.dtype)


@attention_over_cache.register_fake
def _(query, key, value, attn_mask, scale, softcap, mask_op):
    return query.new_empty(*query.shape[:-1], value.shape[-1])


def repeat_kv(x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, S, D]`` -> ``[B, H, S, D]``, head h reading kv head ``h // (H // Hkv)``."""
    b, hkv, s, d = x.shape
    n_rep = query.shape[1] // hkv
    return x[:, :, None, :, :].expand(b, hkv, n_rep, s, d).reshape(b, hkv * n_rep, s, d)


def _scores(query, key, scale, scale_op, softcap=None):
    s = torch.matmul(query, key.transpose(-2, -1))
    s = s * scale if scale_op == "mul" else s / scale
    if softcap is not None:  # Gemma2's order: divide, tanh, multiply, before the mask
        s = torch.tanh(s / softcap) * softcap
    return s


def _apply_mask(s, attn_mask, mask_op):
    if mask_op == "add":
        return s + attn_mask
    if mask_op == "masked_fill":
        return s.masked_fill(attn_mask, float("-inf"))
    if mask_op == "where":
        return torch.where(attn_mask, s, float("-inf"))
    return s


def _softmax(s, query, softmax):
    if softmax == "fp32":
        return torch.softmax(s, dim=-1, dtype=torch.float32).to(query.dtype)
    if softmax == "cast":
        return torch.softmax(s.float(), dim=-1).type_as(query)
    return torch.softmax(s, dim=-1)


@dataclass(frozen=True)
class AttentionForm:
    """One row of the table: how a model writes attention, and what replaces it."""
    scale_op: str
    mask_op: str | None
    softmax: str
    gqa: bool
    softcap: bool = False  # tanh(s / c) * c before the mask (cache forms only)
    cache: bool = False  # over a cache: replaced by attention_over_cache

    @property
    def name(self) -> str:
        return (f"attn_{self.scale_op}_{self.mask_op or 'nomask'}_{self.softmax}softmax"
                f"{'_gqa' if self.gqa else ''}{'_softcap' if self.softcap else ''}"
                f"{'_cache' if self.cache else ''}")

    @property
    def argnames(self) -> tuple[str, ...]:
        """Argument names of the search and replacement functions, in order."""
        if self.mask_op is None:
            return ("query", "key", "value", "scale")
        return ("query", "key", "value", "attn_mask", "scale") + \
            (("softcap",) if self.softcap else ())

    @property
    def causal(self) -> bool:
        return self.mask_op is not None

    def functions(self) -> tuple[Callable, Callable]:
        """(search, replacement) with the same argument names, for register_replacement."""
        f = self

        def expand(x, query):
            return repeat_kv(x, query) if f.gqa else x

        def attend(query, key, value, attn_mask, scale, softcap=None):
            s = _scores(query, expand(key, query), scale, f.scale_op, softcap)
            p = _softmax(_apply_mask(s, attn_mask, f.mask_op), query, f.softmax)
            return torch.matmul(p, expand(value, query))

        def real_scale(scale):
            return scale if f.scale_op == "mul" else 1.0 / scale

        def to_prefill(query, key, value, scale):
            return dense_prefill(query, key, value, real_scale(scale), f.causal)

        def over_cache(query, key, value, attn_mask, scale, softcap):
            return attention_over_cache(query, key, value, attn_mask, real_scale(scale),
                                        softcap, f.mask_op)

        if f.cache and f.softcap:
            def search(query, key, value, attn_mask, scale, softcap):
                return attend(query, key, value, attn_mask, scale, softcap)

            def replace(query, key, value, attn_mask, scale, softcap):
                return over_cache(query, key, value, attn_mask, scale, softcap)
        elif f.cache:
            def search(query, key, value, attn_mask, scale):
                return attend(query, key, value, attn_mask, scale)

            def replace(query, key, value, attn_mask, scale):
                return over_cache(query, key, value, attn_mask, scale, 0.0)
        elif f.mask_op is None:
            def search(query, key, value, scale):
                return attend(query, key, value, None, scale)

            def replace(query, key, value, scale):
                return to_prefill(query, key, value, scale)
        else:
            def search(query, key, value, attn_mask, scale):
                return attend(query, key, value, attn_mask, scale)

            def replace(query, key, value, attn_mask, scale):
                return to_prefill(query, key, value, scale)
        search.__name__, replace.__name__ = f.name, f.name + "_replacement"
        replace.is_replacement = True
        return search, replace

    def example_inputs(self) -> list:
        """Small inputs to trace with (sizes don't matter: matches are re-traced at real ones)."""
        dtype = torch.float32 if self.softmax == "plain" else torch.float16
        q = torch.empty(2, 4, 8, 16, dtype=dtype)
        kv = torch.empty(2, 2 if self.gqa else 4, 8, 16, dtype=dtype)
        inputs = [q, kv, kv.clone()]
        if self.mask_op == "add":
            inputs.append(torch.empty(1, 1, 8, 8, dtype=dtype))
        elif self.mask_op is not None:
            inputs.append(torch.empty(8, 8, dtype=torch.bool))
        return inputs


SOFTMAXES = ("plain", "fp32", "cast")


def forms(fold_gqa: bool = True, softmax: str | None = None, scale_op: str | None = None,
          mask_op: str | None = "any", softcap: bool = False,
          cache: bool = False) -> list[AttentionForm]:
    """The forms of the table, GQA ones first (they must win over the same form unfolded).

    ``softmax``, ``scale_op`` and ``mask_op`` restrict the table to one value of that axis
    (None / "any": every value). ``cache``: the forms over a cache (masked ones only), with
    ``softcap`` or without; the dense forms have no softcap.
    """
    if softcap and not cache:
        return []
    return [AttentionForm(s, m, sm, g, softcap, cache) for g, s, m, sm in
            itertools.product((True, False) if fold_gqa else (False,), SCALE_OPS, MASK_OPS,
                              SOFTMAXES)
            if (softmax is None or sm == softmax) and (scale_op is None or s == scale_op)
            and (mask_op == "any" or m == mask_op) and not (cache and m is None)]
