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


def repeat_kv(x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, S, D]`` -> ``[B, H, S, D]``, head h reading kv head ``h // (H // Hkv)``."""
    b, hkv, s, d = x.shape
    n_rep = query.shape[1] // hkv
    return x[:, :, None, :, :].expand(b, hkv, n_rep, s, d).reshape(b, hkv * n_rep, s, d)


def _scores(query, key, scale, scale_op):
    s = torch.matmul(query, key.transpose(-2, -1))
    return s * scale if scale_op == "mul" else s / scale


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

    @property
    def name(self) -> str:
        return (f"attn_{self.scale_op}_{self.mask_op or 'nomask'}_{self.softmax}softmax"
                f"{'_gqa' if self.gqa else ''}")

    @property
    def argnames(self) -> tuple[str, ...]:
        """Argument names of the search and replacement functions, in order."""
        if self.mask_op is None:
            return ("query", "key", "value", "scale")
        return ("query", "key", "value", "attn_mask", "scale")

    @property
    def causal(self) -> bool:
        return self.mask_op is not None

    def functions(self) -> tuple[Callable, Callable]:
        """(search, replacement) with the same argument names, for register_replacement."""
        f = self

        def expand(x, query):
            return repeat_kv(x, query) if f.gqa else x

        def attend(query, key, value, attn_mask, scale):
            s = _scores(query, expand(key, query), scale, f.scale_op)
            p = _softmax(_apply_mask(s, attn_mask, f.mask_op), query, f.softmax)
            return torch.matmul(p, expand(value, query))

        def to_prefill(query, key, value, scale):
            real_scale = scale if f.scale_op == "mul" else 1.0 / scale
            return dense_prefill(query, key, value, real_scale, f.causal)

        if f.mask_op is None:
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
          mask_op: str | None = "any") -> list[AttentionForm]:
    """The forms of the table, GQA ones first (they must win over the same form unfolded).

    ``softmax``, ``scale_op`` and ``mask_op`` restrict the table to one value of that axis
    (None / "any": every value).
    """
    return [AttentionForm(s, m, sm, g) for g, s, m, sm in
            itertools.product((True, False) if fold_gqa else (False,), SCALE_OPS, MASK_OPS,
                              SOFTMAXES)
            if (softmax is None or sm == softmax) and (scale_op is None or s == scale_op)
            and (mask_op == "any" or m == mask_op)]
