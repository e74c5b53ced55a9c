"""transformers integration: ``attn_implementation="attn_ops"`` for transformers' models.

::

    import attn_ops.hf
    attn_ops.hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attn_ops")
    # or, on a loaded model: model.set_attn_implementation("attn_ops")

:func:`register` adds two entries named ``"attn_ops"``: the attention function
(:func:`attn_ops_attention_forward`) to ``transformers.AttentionInterface``, and transformers'
SDPA mask builder to ``AttentionMaskInterface``. The mask builder matters: transformers passes
``attention_mask=None`` exactly when the mask is plain causal attention (no padding, queries at
the end of the keys, the condition under which its own SDPA path uses ``is_causal``), and a
materialised boolean mask otherwise. The attention function runs ``torch.ops.attn.prefill`` in
the first case and hands every other call to transformers' own ``sdpa_attention_forward``
(never silently dropping a mask).

Attention sinks (gpt-oss passes its per-head ``self.sinks`` as the ``s_aux`` keyword; ``sinks``
is accepted too) run on the op's ``sinks`` argument, as float32. A sinks call that must fall back
(a padding mask, ...) goes to the model's own ``eager_attention_forward`` (its modeling module's),
with the boolean mask made additive, because transformers' SDPA function ignores ``s_aux``.

transformers is imported only by :func:`register` and the fallback, so ``import attn_ops`` (and
even ``import attn_ops.hf``) works without it.

:func:`stats` counts the calls that ran on the ops and the fallbacks, by reason, so a user can
see what a model actually ran (``reset_stats()`` to start over). It counts eager calls; code
compiled by ``torch.compile`` runs the function once, when tracing, and is not counted there
(count ``attn::prefill`` profiler events instead).
"""

from __future__ import annotations

import collections

import torch

from attn_ops import contract

NAME = "attn_ops"
_STATS: collections.Counter = collections.Counter()


def stats() -> dict[str, int]:
    """Eager attention calls since the last :func:`reset_stats`: ``"ops"`` (ran on
    ``attn.prefill``) and ``"fallback: <reason>"`` (handed to transformers' SDPA or the model's
    eager attention), e.g. ``{"ops": 16, "fallback: an explicit attention mask (...)": 2}``."""
    return dict(_STATS)


def reset_stats() -> None:
    """Forget the counts :func:`stats` returns."""
    _STATS.clear()


def _count(what: str) -> None:
    if not torch.compiler.is_compiling():  # a traced call runs once, not once per call
        _STATS[what] += 1


def fallback_reason(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float,
                    is_causal: bool, sliding_window: int | None, kwargs: dict) -> str | None:
    """Why this call cannot run on ``attn.prefill`` (None when it can). Reads metadata only."""
    if attention_mask is not None:
        return "an explicit attention mask (padding or a custom pattern)"
    if dropout > 0:
        return "attention dropout (training)"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return "gradients are required (the attn ops are inference-only)"
    if kwargs.get("cache") is not None:
        return "transformers' own paged cache (continuous batching)"
    if kwargs.get("position_bias") is not None:
        return "position_bias (an additive score term)"
    sinks = _sinks(kwargs)
    if sinks is not None:
        if sinks.shape != (query.shape[1],):
            return f"sinks of shape {tuple(sinks.shape)} (the op takes one per query head)"
        if torch.is_grad_enabled() and sinks.requires_grad:
            return "gradients are required for the sinks (the attn ops are inference-only)"
    if sliding_window is not None and not is_causal:
        return "a bidirectional sliding window"
    d = query.shape[-1]
    if key.shape[-1] != d or value.shape[-1] != d:
        return f"query/key/value head dims differ ({d}, {key.shape[-1]}, {value.shape[-1]})"
    if not (0 < d <= contract.MAX_HEAD_DIM and d % contract.HEAD_DIM_MULTIPLE == 0):
        return f"head dim {d} (the ops take multiples of {contract.HEAD_DIM_MULTIPLE} up to " \
               f"{contract.MAX_HEAD_DIM})"
    if query.dtype not in contract.FLOAT_DTYPES or key.dtype != query.dtype or \
            value.dtype != query.dtype:
        return f"dtypes {query.dtype}/{key.dtype}/{value.dtype}"
    if key.shape[1] == 0 or query.shape[1] % key.shape[1] != 0:
        return f"{query.shape[1]} query heads over {key.shape[1]} kv heads"
    return None


def _sinks(kwargs: dict) -> torch.Tensor | None:
    """The per-head sink logits a model passes (gpt-oss: ``s_aux``), or None."""
    sinks = kwargs.get("s_aux")
    return kwargs.get("sinks") if sinks is None else sinks


def _eager_with_sinks(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    """The model's own eager attention (it knows its sinks); a boolean mask made additive."""
    import sys

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"attn_ops: {type(module).__name__} passes attention sinks in a "
                                  f"call the ops cannot take and its module has no "
                                  f"eager_attention_forward to fall back to")
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.where(attention_mask, 0.0, float("-inf")).to(query.dtype)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                 **kwargs)


def attn_ops_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: torch.Tensor | None,
                               dropout: float = 0.0, scaling: float | None = None,
                               is_causal: bool | None = None, sliding_window: int | None = None,
                               softcap: float | None = None, **kwargs):
    """transformers attention function running ``torch.ops.attn.prefill``.

    Args:
        module: the calling attention module (``is_causal`` is read from it when not passed).
        query: ``[B, H, Sq, D]``; key, value: ``[B, Hkv, Sk, D]`` (``H % Hkv == 0``), one dtype
            of float32 / float16 / bfloat16.
        attention_mask: None for plain causal (or, with ``is_causal=False``, full) attention;
            anything else falls back to transformers' SDPA path.
        dropout: must be 0 for the ops (otherwise: fallback).
        scaling: score scale, default ``D ** -0.5``.
        is_causal: bottom-right aligned causal mask when ``Sq > 1``; a single query (decode
            with a cache) sees every key either way.
        sliding_window: a causal window of this many keys (the query's own included), i.e.
            ``window_left = sliding_window - 1``.
        softcap: ``c`` maps scores s to ``c * tanh(s / c)``.
        s_aux (or sinks), in kwargs: ``[H]`` per-head sink logits (gpt-oss), passed to the op as
            float32 ``sinks``.

    Returns:
        ``(out, None)`` with ``out [B, Sq, H, D]`` in the query's dtype (the layout transformers'
        attention functions return).

    Falls back to ``transformers.integrations.sdpa_attention.sdpa_attention_forward`` (same
    arguments) when :func:`fallback_reason` names a reason: an attention mask, dropout,
    gradients, transformers' paged cache, position bias, a bidirectional window, or
    shapes/dtypes the ops do not take. That fallback raises for ``softcap`` as SDPA does. A call
    with sinks falls back to the model's eager attention instead (SDPA would drop the sinks).
    Like transformers' SDPA path, a causal multi-token query with ``attention_mask=None`` and
    more keys than queries is the prefill of an empty static cache: only the first ``Sq`` keys
    are real, so the others are dropped.
    """
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    reason = fallback_reason(module, query, key, value, attention_mask, dropout, causal,
                             sliding_window, kwargs)
    sinks = _sinks(kwargs)
    _count("ops" if reason is None else f"fallback: {reason}")
    if reason is not None and sinks is not None:
        return _eager_with_sinks(module, query, key, value, attention_mask, dropout, scaling,
                                 dict(kwargs, sliding_window=sliding_window, softcap=softcap))
    if reason is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal,
                                      sliding_window=sliding_window, softcap=softcap, **kwargs)
    b, h, sq, d = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    if causal and 1 < sq < sk:  # empty static cache: keys past Sq are unwritten slots
        key, value, sk = key[:, :, :sq], value[:, :, :sq], sq
    # [B, heads, S, D] -> token-major [B*S, heads, D] (a copy: THD needs tokens outermost).
    q = query.transpose(1, 2).reshape(b * sq, h, d)
    k = key.transpose(1, 2).reshape(b * sk, hkv, d)
    v = value.transpose(1, 2).reshape(b * sk, hkv, d)
    steps = torch.arange(b + 1, device=query.device, dtype=torch.int32)
    out = torch.ops.attn.prefill(
        q, k, v, steps * sq, steps * sk, sq, sk,
        float(scaling) if scaling is not None else d ** -0.5,
        causal, None,
        sliding_window - 1 if sliding_window is not None else -1,
        float(softcap) if softcap else 0.0,
        None if sinks is None else sinks.to(torch.float32))
    return out.view(b, sq, h, d), None


def register() -> None:
    """Make ``attn_implementation="attn_ops"`` available to transformers models (idempotent).

    Raises:
        ImportError: transformers is not installed (``pip install attn_ops[hf]``).
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise ImportError("attn_ops.hf.register() needs transformers (pip install "
                          "'attn_ops[hf]')") from e
    AttentionInterface.register(NAME, attn_ops_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
