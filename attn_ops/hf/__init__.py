"""transformers integration: ``attn_implementation="attn_ops"`` for transformers' models.

::

    import attn_ops.hf
    attn_ops.hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attn_ops")
    # or, on a loaded model: model.set_attn_implementation("attn_ops")

:func:`register` adds two entries named ``"attn_ops"``: the attention function
(:func:`attn_ops_attention_forward`) to ``transformers.AttentionInterface`` and the mask
builder (:func:`attn_ops_mask`) to ``AttentionMaskInterface``. Every attention call of
``generate`` then runs on ``torch.ops.attn.decode`` (one query per sequence) or the paged
``torch.ops.attn.prefill``, eager and under ``torch.compile``, reading the KV cache in place:

* DynamicCache, StaticCache and cache-free calls: ``key.transpose(1, 2)`` is a paged cache with
  one block per sequence (``block_table = arange(B)[:, None]``); a StaticCache's sequences read
  ``cache_position``'s valid prefix only (counts computed on the device: no host sync, no
  recompile per position).
* Padded batches (a 2D ``attention_mask`` with zeros, left or right): design choice, unpad
  through a block table rather than extend the op contract. The mask builder computes once per
  forward, on the device, each row's valid keys compacted in order (a stable sort) and their
  count; the layers read the keys through a block-size-1 strided view of the same memory (any
  key addressable, zero copy). The real queries are compacted the same way (a copy of q and of
  the output, both small), so the op's bottom-right causal mask lines up. A 2D mask is
  treated this way even when it has no zero: deciding otherwise would read it on the host.
* Sliding windows (Gemma2, Mistral; ``sliding_window`` -> ``window_left = sliding_window - 1``)
  and softcap (Gemma2) run on the op's ``window_left`` / ``softcap`` (on CPU "auto" picks the
  reference backend for softcap: the sdpa backend refuses it). Attention sinks (gpt-oss's
  ``s_aux``) run on the op's ``sinks``.

A call the ops cannot take falls back, counted with its reason (:func:`stats`): to transformers'
``sdpa_attention_forward`` with the equivalent boolean mask, or, with sinks or a softcap (which
SDPA drops or refuses), to the model's own ``eager_attention_forward``. Mask patterns the
builder does not know (custom ``and``/``or`` functions, packed sequences, chunked attention)
are built by transformers' ``sdpa_mask`` and fall back the same way. One case raises instead:
a sliding window that can bite, over several queries, in a batch whose valid keys are not one
run per row (padding between tokens) fails a device-side assert rather than return a wrong
answer.

:func:`stats` counts eager calls; code compiled by ``torch.compile`` runs the function once,
while tracing, so count the profiler events ``attn::decode`` / ``attn::prefill`` there
(``torch.profiler.profile``; ``key_averages()`` has one row per op with its call count).

transformers is imported only by :func:`register`, the mask builder and the fallbacks, so
``import attn_ops`` (and even ``import attn_ops.hf``) works without it.
"""

from __future__ import annotations

from attn_ops.hf.attention import (attn_ops_attention_forward, fallback_reason, reset_stats,
                                   stats)
from attn_ops.hf.mask import OpsMask, attn_ops_mask

NAME = "attn_ops"

__all__ = ["NAME", "OpsMask", "attn_ops_attention_forward", "attn_ops_mask", "fallback_reason",
           "register", "reset_stats", "stats"]


def register() -> None:
    """Make ``attn_implementation="attn_ops"`` available to transformers models (idempotent).

    Raises:
        ImportError: transformers is not installed (``pip install attn_ops[hf]``).
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError("attn_ops.hf.register() needs transformers (pip install "
                          "'attn_ops[hf]')") from e
    AttentionInterface.register(NAME, attn_ops_attention_forward)
    AttentionMaskInterface.register(NAME, attn_ops_mask)
