"""The attention function registered under ``"attn_ops"``: transformers' calls on the ops.

Key/value ``[B, Hkv, Sk, D]`` (a DynamicCache's tensors, a StaticCache's buffers, fresh
projections) are handed to the ops as views, never copied:

* one block per sequence: ``key.transpose(1, 2)`` is a ``[num_blocks=B, block_size=Sk, Hkv, D]``
  strided paged cache, ``block_table = arange(B)[:, None]`` (no 2D mask, or a StaticCache);
* block size 1 (a padded batch): ``key.as_strided([N, 1, Hkv, D], [sS, sS, sH, 1])`` puts key
  ``(b, s)`` at block ``b * sB / sS + s`` (strides ``sB, sH, sS`` of key), so a block table can
  list any keys of a row: the compacted valid keys of :class:`attn_ops.hf.mask.OpsMask`.

One query per sequence runs ``attn.decode`` on ``q[:, :, 0]``; several run the paged
``attn.prefill`` on a token-major copy of q (small next to the cache); its ``[B*Sq, H, D]``
output viewed as ``[B, Sq, H, D]`` is the layout transformers expects back.
"""

from __future__ import annotations

import collections
import sys

import torch

from attn_ops import contract
from attn_ops.hf.mask import OpsMask

_STATS: collections.Counter = collections.Counter()


def stats() -> dict[str, int]:
    """Eager attention calls since the last :func:`reset_stats`: ``"ops"`` (ran on
    ``attn.decode`` / ``attn.prefill``) and ``"fallback: <reason>"`` (handed to transformers'
    SDPA or the model's eager attention), e.g. ``{"ops": 16, "fallback: dropout ...": 2}``.

    Calls inside code compiled by ``torch.compile`` are not counted (the function runs once,
    while tracing): count the profiler events ``attn::decode`` / ``attn::prefill`` there.
    """
    return dict(_STATS)


def reset_stats() -> None:
    """Forget the counts :func:`stats` returns."""
    _STATS.clear()


def _count(what: str) -> None:
    if not torch.compiler.is_compiling():  # a traced call runs once, not once per call
        _STATS[what] += 1


def fallback_reason(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask, dropout: float,
                    is_causal: bool, sliding_window: int | None, kwargs: dict) -> str | None:
    """Why this call cannot run on the ops (None when it can). Reads metadata only.

    ``attention_mask``: None, an :class:`~attn_ops.hf.mask.OpsMask` (checked against the keys
    here), or a tensor (always a fallback: a pattern the ops do not take).
    """
    if attention_mask is not None and not isinstance(attention_mask, OpsMask):
        return "an explicit attention mask (a custom pattern)"
    if dropout > 0:
        return "attention dropout (training)"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return "gradients are required (the attn ops are inference-only)"
    if kwargs.get("cache") is not None and type(kwargs["cache"]).__name__ == \
            "PagedAttentionCache":
        return "transformers' own paged cache (continuous batching)"
    if kwargs.get("position_bias") is not None:
        return "position_bias (an additive score term)"
    sinks = _sinks(kwargs)
    if sinks is not None:
        if sinks.shape != (query.shape[1],):
            return f"sinks of shape {tuple(sinks.shape)} (the op takes one per query head)"
        if torch.is_grad_enabled() and sinks.requires_grad:
            return "gradients are required for the sinks (the attn ops are inference-only)"
    if sliding_window is not None and not is_causal and attention_mask is None:
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
    if key.shape != value.shape:
        return f"key/value shapes differ ({tuple(key.shape)}, {tuple(value.shape)})"
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        return "key/value head dims are not contiguous"
    if isinstance(attention_mask, OpsMask):
        return _mask_reason(attention_mask, query, key, value, sliding_window)
    return None


def _mask_reason(mask: OpsMask, query, key, value, sliding_window) -> str | None:
    if key.shape[2] != mask.kv_length or query.shape[2] != mask.q_length:
        return (f"{query.shape[2]} queries over {key.shape[2]} keys where the mask describes "
                f"{mask.q_length} over {mask.kv_length}")
    if (sliding_window or None) != mask.window:
        return f"sliding_window {sliding_window} where the mask has window {mask.window}"
    if mask.padded and key.shape[0] > 1 and (_rows_per_sequence(key) is None or
                                             _rows_per_sequence(key) != _rows_per_sequence(value)):
        return (f"key/value strides {tuple(key.stride())}/{tuple(value.stride())}: no "
                f"block-size-1 view with one block table reads both")
    return None


def _rows_per_sequence(t: torch.Tensor):
    """Blocks of size 1 between sequence b and b + 1 of ``t`` ``[B, Hkv, S, D]`` (its batch
    stride in token strides), or None when the batch stride is not a multiple of it."""
    s_b, s_s = t.stride(0), t.stride(2)
    if s_s <= 0 or s_b % s_s != 0:
        return None
    return s_b // s_s


def _token_view(t: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, S, D]`` -> block-size-1 paged view ``[N, 1, Hkv, D]`` over the same memory."""
    b, hkv, s, d = t.shape
    s_b, s_h, s_s = t.stride(0), t.stride(1), t.stride(2)
    n = (b - 1) * (s_b // s_s) + s if b > 1 else s
    return t.as_strided((n, 1, hkv, d), (s_s, s_s, s_h, 1))  # keeps t's storage offset


def _sinks(kwargs: dict) -> torch.Tensor | None:
    """The per-head sink logits a model passes (gpt-oss: ``s_aux``), or None."""
    sinks = kwargs.get("s_aux")
    return kwargs.get("sinks") if sinks is None else sinks


def _model_eager(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    """The model's own eager attention (it knows its sinks and softcap); a boolean mask made
    additive."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"attn_ops: {type(module).__name__} passes attention sinks or "
                                  f"a softcap in a call the ops cannot take and its module has "
                                  f"no eager_attention_forward to fall back to")
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.where(attention_mask, 0.0, float("-inf")).to(query.dtype)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                 **kwargs)


def _fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal,
              sliding_window, softcap, kwargs):
    if isinstance(attention_mask, OpsMask):
        attention_mask = attention_mask.dense()
    if _sinks(kwargs) is not None or softcap:  # transformers' SDPA drops sinks, refuses softcap
        return _model_eager(module, query, key, value, attention_mask, dropout, scaling,
                            dict(kwargs, sliding_window=sliding_window, softcap=softcap))
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal,
                                  sliding_window=sliding_window, softcap=softcap, **kwargs)


def attn_ops_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask,
                               dropout: float = 0.0, scaling: float | None = None,
                               is_causal: bool | None = None, sliding_window: int | None = None,
                               softcap: float | None = None, **kwargs):
    """transformers attention function running ``torch.ops.attn.decode`` / ``attn.prefill``.

    Args:
        module: the calling attention module (``is_causal`` is read from it when not passed).
        query: ``[B, H, Sq, D]``; key, value: ``[B, Hkv, Sk, D]`` (``H % Hkv == 0``, any
            strides with a contiguous last dim), one dtype of float32 / float16 / bfloat16.
        attention_mask: what the ``"attn_ops"`` mask builder made: None (plain causal, or full
            attention with ``is_causal=False``, over all Sk keys), an
            :class:`~attn_ops.hf.mask.OpsMask` (valid key ranges), or a tensor (a pattern the
            ops do not take: fallback).
        dropout: must be 0 for the ops (otherwise: fallback).
        scaling: score scale, default ``D ** -0.5``.
        is_causal: bottom-right aligned causal mask when ``Sq > 1``.
        sliding_window: a causal window of this many keys (the query's own included), i.e.
            ``window_left = sliding_window - 1``.
        softcap: ``c`` maps scores s to ``c * tanh(s / c)``.
        s_aux (or sinks), in kwargs: ``[H]`` per-head sink logits (gpt-oss), passed to the op as
            float32 ``sinks``.

    Returns:
        ``(out, None)`` with ``out [B, Sq, H, D]`` in the query's dtype.

    A call :func:`fallback_reason` refuses goes to transformers' ``sdpa_attention_forward``
    with the equivalent boolean mask, or, with sinks or a softcap (which SDPA drops or refuses),
    to the model's own ``eager_attention_forward``. Like transformers' SDPA path, a causal
    multi-token query with ``attention_mask=None`` and more keys than queries is the prefill of
    an empty static cache: only the first ``Sq`` keys are read.
    """
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    reason = fallback_reason(module, query, key, value, attention_mask, dropout, causal,
                             sliding_window, kwargs)
    _count("ops" if reason is None else f"fallback: {reason}")
    if reason is not None:
        return _fallback(module, query, key, value, attention_mask, dropout, scaling,
                         is_causal, sliding_window, softcap, kwargs)
    sinks = _sinks(kwargs)
    sinks = None if sinks is None else sinks.to(torch.float32)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    cap = float(softcap) if softcap else 0.0
    window_left = sliding_window - 1 if sliding_window is not None else -1
    if isinstance(attention_mask, OpsMask):
        return _with_mask(attention_mask, query, key, value, scale, window_left, cap, sinks)
    return _plain(query, key, value, causal, scale, window_left, cap, sinks)


def _batch_table(b: int, device) -> torch.Tensor:
    return torch.arange(b, device=device, dtype=torch.int32)[:, None]


def _thd(query: torch.Tensor) -> torch.Tensor:
    """``[B, H, Sq, D]`` -> token-major ``[B*Sq, H, D]`` (a copy of q: small)."""
    b, h, sq, d = query.shape
    return query.transpose(1, 2).reshape(b * sq, h, d)


def _plain(query, key, value, causal, scale, window_left, cap, sinks):
    """No mask: every key the layer holds (bottom-right causal), one block per sequence."""
    b, h, sq, d = query.shape
    sk = key.shape[2]
    if causal and 1 < sq < sk:  # empty static cache: keys past Sq are unwritten slots
        key, value, sk = key[:, :, :sq], value[:, :, :sq], sq
    kc, vc = key.transpose(1, 2), value.transpose(1, 2)
    table = _batch_table(b, query.device)
    if sq == 1:
        lens = torch.full((b,), sk, device=query.device, dtype=torch.int32)
        out = torch.ops.attn.decode(query[:, :, 0], kc, vc, lens, table, scale, window_left,
                                    cap, sinks)
        return out.view(b, 1, h, d), None
    steps = torch.arange(b + 1, device=query.device, dtype=torch.int32)
    out = torch.ops.attn.prefill(_thd(query), kc, vc, steps * sq, steps * sk, sq, sk, scale,
                                 causal, table, window_left, cap, sinks)
    return out.view(b, sq, h, d), None


def _with_mask(mask: OpsMask, query, key, value, scale, window_left, cap, sinks):
    """Valid key ranges from the mask builder: positions (one block per sequence) or padded
    (compacted keys through block size 1, real queries compacted)."""
    b, h, sq, d = query.shape
    if mask.padded:
        kc, vc = _token_view(key), _token_view(value)
        table = mask.block_table(_rows_per_sequence(key) if b > 1 else 0)
        if mask.window_folded:
            window_left = -1
    else:
        kc, vc = key.transpose(1, 2), value.transpose(1, 2)
        table = _batch_table(b, query.device)
    if sq == 1:
        out = torch.ops.attn.decode(query[:, :, 0], kc, vc, mask.seqlens_k, table, scale,
                                    window_left, cap, sinks)
        return out.view(b, 1, h, d), None
    if mask.one_run is not None and window_left >= 0:
        torch._assert_async(mask.one_run, "attn_ops: a sliding window over a batch whose valid "
                            "keys are not one run per row (padding between tokens): the ops "
                            "cannot express it; use attn_implementation='sdpa' or 'eager'")
    q = _thd(query)
    if mask.q_order is not None:  # the real queries first, row by row: sequence b = row b
        q = q.index_select(0, mask.q_order)
    out = torch.ops.attn.prefill(q, kc, vc, mask.cu_seqlens_q, mask.cu_seqlens_k, sq,
                                 mask.kv_length, scale, True, table, window_left, cap, sinks)
    if mask.q_inverse is not None:  # back to [B, Sq]; padding queries got zeros
        out = out.index_select(0, mask.q_inverse)
    return out.view(b, sq, h, d), None
