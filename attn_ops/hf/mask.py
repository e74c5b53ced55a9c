"""The mask builder registered under ``"attn_ops"`` and the key ranges it hands to the layers.

transformers builds one mask per mask type (full, sliding) per forward and passes it, as
``attention_mask``, to every layer's attention function. Instead of a ``[B, 1, Sq, Sk]`` boolean
mask, :func:`attn_ops_mask` returns what the ops read, computed once per forward on the device
(no host sync: shapes come from host ints, everything else stays a tensor):

* ``None``: plain causal attention over all the keys the layer holds (no 2D mask, the keys end
  at the last query: DynamicCache, no cache). The layer reads ``sliding_window`` itself.
* :class:`OpsMask` without a block table ("positions"): no padding, but the layer holds more
  keys than were written (StaticCache): sequence b reads its first ``seqlens_k[b]`` keys,
  ``clamp(q_offset + Sq - kv_offset, 0, Sk)``, through one block per sequence.
* :class:`OpsMask` with a block table ("padded", a 2D ``attention_mask`` was given): the valid
  keys of each row (the 2D mask, and no key past the last query) are compacted, in order,
  through a table of block size 1 over the layer's keys; ``seqlens_k`` counts them. The real
  queries are compacted too (a stable sort of the ``B * Sq`` query rows: row b's real queries,
  in order, are sequence b of the THD batch; the padding queries come last, owned by no
  sequence, and get zeros); each is then the last of its row's valid keys so far, so the op's
  bottom-right causal mask lines up with the compacted keys. Exact for any padding pattern
  without a window. With a window: one query
  folds the window into the key set (exact); several queries keep ``window_left`` on the
  compacted keys, exact when each row's valid keys are one run (left or right padding), which
  is asserted on the device (``torch._assert_async``: an error, never a silent wrong answer).

Everything else (custom ``and``/``or`` mask functions, packed sequences, chunked attention,
bidirectional masks, a caller asking for a materialised mask) returns transformers' own
``sdpa_mask`` tensor, and the attention function falls back with a counted reason.
"""

from __future__ import annotations

import torch


class OpsMask:
    """Per-forward key ranges for one mask type (built by :func:`attn_ops_mask`).

    Attributes:
        q_length, kv_length, kv_offset: Sq, the keys each layer holds (Sk), and the absolute
            position of key 0 (transformers' ``get_mask_sizes``).
        window: the sliding window (keys per query, the query's own included) or None.
        seqlens_k: int32 ``[B]``, keys each sequence reads (compacted ones when padded).
        key_index: int32 ``[B, Sk]`` or None: padded mode's compacted key indices (valid keys
            first, in order); None: sequence b reads keys ``0 .. seqlens_k[b] - 1``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B+1]`` for several queries (None for one).
        q_order, q_inverse: int64 ``[B*Sq]`` or None: padded mode's order of the token-major
            query rows (real ones first, by row) and its inverse; None for one query or no
            padding.
        window_folded: the window is part of the key set (padded decode): the op runs with
            ``window_left = -1``.
        one_run: bool ``[]`` or None: each row's valid keys form one run (checked on the device
            where the compacted window relies on it).
    """

    # transformers passes a mask generate built in advance (static caches) through the model's
    # own create_causal_mask, which reads ``ndim`` (2 = a padding mask to convert) and then
    # hands it to the builder, which returns it as it is.
    ndim = 4

    def __init__(self, q_length, kv_length, kv_offset, window, seqlens_k, key_index=None,
                 q_order=None, q_inverse=None, window_folded=False, one_run=None,
                 sdpa_args=None, q_counts=None):
        self.q_length, self.kv_length, self.kv_offset = q_length, kv_length, kv_offset
        self.window, self.seqlens_k, self.key_index = window, seqlens_k, key_index
        self.cu_seqlens_q = self.cu_seqlens_k = None
        if q_length > 1:  # once per forward, not per layer
            b = seqlens_k.shape[0]
            if q_counts is None:
                q_counts = torch.full((b,), q_length, device=seqlens_k.device, dtype=torch.int32)
            self.cu_seqlens_q, self.cu_seqlens_k = _cumulative(q_counts), _cumulative(seqlens_k)
        self.q_order, self.q_inverse = q_order, q_inverse
        self.window_folded, self.one_run = window_folded, one_run
        self._sdpa_args = sdpa_args or {}
        self._tables: dict = {}

    @property
    def padded(self) -> bool:
        """The keys are read through a compacting block table of block size 1."""
        return self.key_index is not None

    def block_table(self, rows_per_sequence) -> torch.Tensor:
        """int32 ``[B, Sk]``: block ids in a block-size-1 view whose sequence b starts at block
        ``b * rows_per_sequence`` (memoised per layout: one add per forward, not per layer)."""
        table = self._tables.get(rows_per_sequence)
        if table is None:
            b = self.key_index.shape[0]
            base = torch.arange(b, device=self.key_index.device, dtype=torch.int32)
            table = self.key_index + (base * rows_per_sequence)[:, None]
            self._tables[rows_per_sequence] = table
        return table

    def dense(self) -> torch.Tensor:
        """transformers' boolean ``[B, 1, Sq, Sk]`` mask for the same call (for a fallback)."""
        from transformers.masking_utils import sdpa_mask
        return sdpa_mask(**dict(self._sdpa_args, allow_is_causal_skip=False,
                                allow_is_bidirectional_skip=False))

    def __repr__(self) -> str:
        mode = "padded" if self.padded else "positions"
        return (f"OpsMask({mode}, q_length={self.q_length}, kv_length={self.kv_length}, "
                f"kv_offset={self.kv_offset}, window={self.window})")


def _pattern_window(mask_function, local_size, config) -> tuple[bool, int | None]:
    """(known, window): plain causal (window None) or transformers' sliding-window causal."""
    from transformers.masking_utils import causal_mask_function
    if mask_function is causal_mask_function:
        return True, None
    # create_sliding_window_causal_mask passes local_size = config.sliding_window; chunked
    # attention passes local_size = config.attention_chunk_size (not a window: not ours).
    if local_size is not None and getattr(config, "attention_chunk_size", None) is None and \
            local_size == getattr(config, "sliding_window", None):
        return True, int(local_size)
    return False, None


def attn_ops_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                  mask_function=None, attention_mask: torch.Tensor | None = None,
                  local_size: int | None = None, allow_is_causal_skip: bool = True,
                  allow_is_bidirectional_skip: bool = False, use_vmap: bool = False,
                  device="cpu", config=None, **kwargs):
    """transformers mask builder (``AttentionMaskInterface``): ``None``, an :class:`OpsMask`,
    or, for a pattern the ops do not take, transformers' ``sdpa_mask`` tensor.

    Args (transformers' mask-interface arguments):
        batch_size, q_length, kv_length: B, Sq and the keys each layer holds (Sk).
        q_offset: absolute position of query 0 (an int, or a 0-d tensor for static caches).
        kv_offset: absolute position of key 0.
        mask_function: the pattern (causal, or sliding-window causal with ``local_size``).
        attention_mask: bool ``[B, L]`` 2D padding mask over absolute positions, or None.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask
    if isinstance(attention_mask, OpsMask):  # built by generate for this very forward
        return attention_mask
    if mask_function is None:
        mask_function = causal_mask_function
    sdpa_args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=allow_is_causal_skip,
                     allow_is_bidirectional_skip=allow_is_bidirectional_skip, use_vmap=use_vmap,
                     device=device, **kwargs)
    known, window = _pattern_window(mask_function, local_size, config)
    # allow_is_causal_skip=False asks for a real mask (to combine with another), except for a
    # decode step, where create_*_mask turn it off by themselves for static caches.
    if not known or use_vmap or (not allow_is_causal_skip and q_length != 1):
        return sdpa_mask(**sdpa_args)
    if attention_mask is None and not isinstance(q_offset, torch.Tensor) and \
            q_offset + q_length == kv_offset + kv_length:
        return None  # plain bottom-right causal over every key the layer holds
    device = torch.device(device)
    end = q_offset + q_length - kv_offset  # keys 0 .. end-1 are at or before the last query
    if attention_mask is None:
        end = torch.as_tensor(end, device=device).reshape(1)
        seqlens = end.clamp(0, kv_length).to(torch.int32).repeat(batch_size)
        return OpsMask(q_length, kv_length, kv_offset, window, seqlens, sdpa_args=sdpa_args)
    return _padded(batch_size, q_length, kv_length, q_offset, kv_offset, window,
                   attention_mask, end, device, sdpa_args)


def _padded(b, sq, sk, q_offset, kv_offset, window, attention_mask, end, device, sdpa_args):
    """The "padded" :class:`OpsMask`: compacted keys and queries."""
    pad = attention_mask.to(device=device, dtype=torch.bool)
    need = kv_offset + sk
    if pad.shape[1] < need:  # a StaticCache's slots past the 2D mask hold no token yet
        pad = torch.nn.functional.pad(pad, (0, need - pad.shape[1]), value=False)
    pad = pad[:, kv_offset:need]  # [B, Sk]: the layer's keys
    keys = torch.arange(sk, device=device)
    valid = pad & (keys < end)[None]  # end: an int, or a 0-d tensor (static caches)
    window_folded = False
    if window is not None and sq == 1:  # the one query sees keys > its position - window
        valid = valid & (keys > end - 1 - window)[None]
        window_folded = True
    # A stable sort puts the valid keys first, in their order: the compacted key list.
    key_index = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
    seqlens = valid.sum(1, dtype=torch.int32)
    q_order = q_inverse = one_run = None
    q_counts = None
    if sq > 1:
        at = (torch.arange(sq, device=device) + (q_offset - kv_offset)).clamp(0, sk - 1)
        q_valid = pad.index_select(1, at)  # [B, Sq]: each query's own token, is it real?
        q_order = torch.sort((~q_valid).reshape(-1).to(torch.uint8), stable=True).indices
        q_inverse = torch.argsort(q_order)
        q_counts = q_valid.sum(1, dtype=torch.int32)
        if window is not None and sk > window:  # the window can bite: it needs one run
            starts = valid & ~torch.nn.functional.pad(valid[:, :-1], (1, 0), value=False)
            one_run = (starts.sum(1) <= 1).all()
    return OpsMask(sq, sk, kv_offset, window, seqlens, key_index.to(torch.int32), q_order,
                   q_inverse, window_folded, one_run, sdpa_args, q_counts)


def _cumulative(counts: torch.Tensor) -> torch.Tensor:
    """int32 ``[B+1]`` cumulative sums of ``[B]`` counts, from 0."""
    return torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
