"""Reference backend: pure torch, any device, the executable form of the op contract.

Every other backend is tested against this one, and this one against an independent float64 loop
(tests/attn_ops/backends/test_reference.py). It is vectorised over sequences and heads:
variable-length batches are gathered into padded ``[B, max_len, ...]`` tiles sized by the static
``max_seqlen_*`` bounds, so there is no Python loop over sequences and no host sync. Scores and
softmax are computed in float32; memory is O(B * H * max_seqlen_q * max_seqlen_k), fine for an
oracle and for CPU demos, not for long contexts.

Isolation (the contract: nothing a row does not see reaches its output). A masked score becomes
an exact zero weight, but ``0 * NaN = NaN`` in ``p @ v``, so masking scores alone lets a NaN/Inf
in an unseen key or value through. So a padded tile position repeats its own sequence's last token
(never another sequence's row or an unowned cache slot); a sequence with no token has only rows
that see no key, which are set to zero with a select. When causality or a window hides keys inside
a sequence, key rows holding a non-finite value are zeroed in the tiles, and a query row that does
see one comes out NaN (:func:`poison_rows`): NaN is never hidden. Measured on one CPU thread
(B=8, 256 keys, 8 kv heads, D=128): zeroing every padded position with masked_fill_ cost
2.5-4.7 ms beside a 1.2 ms gather, the own-row padding nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from attn_ops.contract import FP8_MAX

name = "reference"


def supports(config) -> str | None:
    """The reference serves every op, device, dtype and option of the contract."""
    return None


# ---------------------------------------------------------------------------------------------
# store_kvcache
# ---------------------------------------------------------------------------------------------

def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``saturate(x / scale)`` in ``dtype`` (float8_e4m3fn): x ``[T, Hkv, D]``, scale ``[]`` or
    ``[Hkv]`` float32. Clamped to +-448 (e4m3fn has no infinity: an overflow would be NaN),
    rounded to nearest even by the cast; NaN stays NaN."""
    q = x.float() / scale.reshape(-1, 1)
    return q.clamp(-FP8_MAX, FP8_MAX).to(dtype)


def dequantize(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``x * scale`` in float32 for FP8 rows ``[..., Hkv, D]`` (scale ``[]``/``[Hkv]``); else x."""
    if scale is None:
        return x
    return x.float() * scale.reshape(-1, 1)


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Write ``key[t]``/``value[t]`` ``[T, Hkv, D]`` to flat slot ``slot_mapping[t]``; skip ``-1``.

    FP8 caches (with ``k_scale``/``v_scale``) receive :func:`quantize_fp8` of the rows; the copy
    then runs on their bytes (CPU torch has no index_copy_ for float8). Caches may be any strided
    view with a contiguous last dim: the rows are written through the strides
    (:func:`write_slots`), never into a copy.

    Rows with slot -1 are redirected without a host sync (:func:`redirect_padding`). A cache
    with no slot can only take padding: nothing to write.
    """
    t = key.shape[0]
    if t == 0 or k_cache.numel() == 0:
        return
    if k_scale is None and v_scale is None and _on_host(slot_mapping):
        return _store_on_host(key, value, k_cache, v_cache, slot_mapping)
    plan = redirect_padding(slot_mapping)
    for src, cache, scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        if scale is not None:
            src, cache = quantize_fp8(src, scale, cache.dtype).view(torch.uint8), \
                cache.view(torch.uint8)
        write_slots(cache, plan.index, plan.rows(src, cache))


class PaddingRedirect(NamedTuple):
    """Where a store's padding rows (slot -1) write instead, decided on the device (no sync): the
    first valid row's slot with that row's data (the same bytes twice: no race), or, when no row
    is valid, slot 0 with its own contents (a no-op). Also for scatter kernels that take no -1."""
    valid: torch.Tensor      # [T] bool
    first: torch.Tensor      # [1] int64: the first valid row (0 when none is)
    any_valid: torch.Tensor  # [] bool
    fill_slot: torch.Tensor  # [1] int64: where padding writes
    index: torch.Tensor      # [T] int64: every row's slot, padding redirected

    def rows(self, src: torch.Tensor, cache: torch.Tensor, read=None) -> torch.Tensor:
        """``src [T, Hkv, D]`` with padded rows replaced by what their redirected slot gets;
        ``read(cache, slots)`` reads cache rows (default :func:`read_slots`)."""
        current = (read or read_slots)(cache, self.fill_slot)  # [1, Hkv, D]
        filler = torch.where(self.any_valid, src.index_select(0, self.first), current)
        return torch.where(self.valid[:, None, None], src, filler)


def redirect_padding(slot_mapping: torch.Tensor) -> PaddingRedirect:
    """The :class:`PaddingRedirect` of ``slot_mapping [T]`` (int32/int64, ``T >= 1``)."""
    slots = slot_mapping.to(torch.int64)
    valid = slots >= 0
    # Index with 1-element tensors (index_select), never 0-d ones: t[zero_dim_tensor] converts
    # the index to a Python int, a host sync (and a data-dependent guard under compile).
    first = valid.to(torch.int8).argmax().reshape(1)
    any_valid = valid.any()
    fill_slot = torch.where(any_valid, slots.index_select(0, first), 0)
    return PaddingRedirect(valid, first, any_valid, fill_slot,
                           torch.where(valid, slots, fill_slot))


def _on_host(t: torch.Tensor) -> bool:
    """A plain CPU tensor outside tracing: reading its values costs no device sync."""
    return t.is_cpu and type(t) is torch.Tensor and not torch.compiler.is_compiling()


def _store_on_host(key, value, k_cache, v_cache, slot_mapping) -> None:
    """The CPU store: two ``index_copy_`` calls, after dropping padding rows when there are any.

    On the CPU a data-dependent branch is free (no device to wait for, no graph being captured;
    traced calls take the fake kernel), so the sync-free redirection of padding rows below
    (about 16 small ops: 111 us against 8 us for the two copies, issue 15) is not needed: one
    ``min`` says whether any row is padding.
    """
    slots = slot_mapping if slot_mapping.dtype == torch.int64 else slot_mapping.long()
    # A short slot list is read as a list (0.3 us for one decode token against 1.4 for min()).
    if (min(slots.tolist()) if slots.shape[0] <= 64 else int(slots.min())) < 0:
        keep = (slots >= 0).nonzero().squeeze(1)
        slots, key, value = slots.index_select(0, keep), key.index_select(0, keep), \
            value.index_select(0, keep)
    write_slots(k_cache, slots, key)
    write_slots(v_cache, slots, value)


def write_slots(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """``cache[slot // bs, slot % bs] = rows`` in place: cache ``[N, bs, Hkv, D]`` (any strides,
    last dim contiguous), slots int64 ``[T]`` in range, rows ``[T, Hkv, D]``.

    A contiguous cache takes ``index_copy_`` on its flat ``[N * bs, Hkv, D]`` view; any other
    layout (a transposed ``[B, Hkv, S, D]`` cache has no flat view) ``index_put_`` with
    (block, offset) pairs, which writes through the strides.
    """
    if cache.is_contiguous():
        cache.flatten(0, 1).index_copy_(0, slots, rows)
    else:
        bs = cache.shape[1]
        cache.index_put_((torch.div(slots, bs, rounding_mode="floor"), slots % bs), rows)


def read_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``cache[slot // bs, slot % bs]``: a fresh ``[*slots.shape, Hkv, D]`` tensor from cache
    ``[N, bs, Hkv, D]`` (any strides, last dim contiguous) at int64 flat slots (in range).

    A contiguous cache is read by index_select on its flat view (4x faster than advanced
    indexing on one CPU thread, see :func:`_gather`); any other layout with advanced indexing on
    the 4-D view, which reads only the rows asked for, through the strides (no cache copy).
    """
    if cache.is_contiguous():
        return _gather(cache.view(-1, *cache.shape[2:]), slots)
    bs = cache.shape[1]
    return cache[torch.div(slots, bs, rounding_mode="floor"), slots % bs]


# ---------------------------------------------------------------------------------------------
# Gathering variable-length sequences into padded tiles
# ---------------------------------------------------------------------------------------------

class Tiles(NamedTuple):
    """One call's work as padded tiles (shared with the sdpa backend).

    q ``[B, Mq, H, D]``; k, v ``[B, Mk, Hkv, D]`` (a padded position repeats its sequence's
    last token); allowed ``[B, Mq, Mk]`` bool, the contract's mask; bad ``[B, Mk, Hkv]`` bool,
    valid key rows whose k or v held a non-finite value (zeroed in k, v), or None when no key is
    hidden inside a sequence (then every valid row sees every valid key of its own sequence, and
    the arithmetic propagates NaN/Inf to exactly the rows that see it).
    """
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    allowed: torch.Tensor
    bad: torch.Tensor | None


def _own_positions(lens: torch.Tensor, max_len: int):
    """Position ``[B, max_len]`` each tile position reads (its own, or for padding the
    sequence's last, 0 when it has none) and its validity ``[B, max_len]``."""
    pos = torch.arange(max_len, device=lens.device, dtype=torch.int64)
    valid = pos[None, :] < lens[:, None]
    return torch.minimum(pos[None, :], (lens[:, None] - 1).clamp(min=0)), valid


def _padded_rows(cu: torch.Tensor, max_len: int, total: int):
    """Row index ``[B, max_len]`` (int64) of position p of sequence b, its validity, and lengths.

    Padding reads the sequence's last row; a sequence with no row reads any row below
    ``total`` (only rows that see no key, zeroed later, use it).
    """
    lens = (cu[1:] - cu[:-1]).to(torch.int64)
    pos, valid = _own_positions(lens, max_len)
    rows = (cu[:-1, None].to(torch.int64) + pos).clamp(0, max(total - 1, 0))
    return rows, valid, lens


def _paged_rows(block_table: torch.Tensor, lens: torch.Tensor, max_len: int, block_size: int):
    """Flat cache slot ``[B, max_len]`` of token p of sequence b through its block-table row.

    Padding reads the sequence's last token; a sequence with none reads slot 0 (only rows that
    see no key, zeroed later, use it): entries past its last block are never read.
    """
    pos, valid = _own_positions(lens, max_len)
    block_col = (pos // block_size).clamp(max=max(block_table.shape[1] - 1, 0))
    blocks = block_table.to(torch.int64).gather(1, block_col)
    slots = torch.where(lens[:, None] > 0, blocks * block_size + pos % block_size, 0)
    return slots, valid


def _gather(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` for x ``[N, ...]`` and rows of any shape: index_select on the flat index, 4x
    faster than advanced indexing on one CPU thread (1.2 vs 4.8 ms for [8, 256, 8, 128] fp32)."""
    return x.index_select(0, rows.reshape(-1)).view(*rows.shape, *x.shape[1:])


def allowed_pairs(q_valid: torch.Tensor, k_valid: torch.Tensor, lq: torch.Tensor,
                  lk: torch.Tensor, causal: bool, window_left: int) -> torch.Tensor:
    """The contract's mask: which (query, key) pairs may attend, ``[B, Mq, Mk]`` bool.

    q_valid ``[B, Mq]``, k_valid ``[B, Mk]`` (padding), lq/lk ``[B]``. Causal is bottom-right
    aligned (query i is token ``i + lk - lq``); ``window_left >= 0`` bounds the keys from below.
    """
    mq, mk = q_valid.shape[1], k_valid.shape[1]
    qi = torch.arange(mq, device=q_valid.device)[None, :, None]
    kj = torch.arange(mk, device=q_valid.device)[None, None, :]
    allowed = q_valid[:, :, None] & k_valid[:, None, :]
    diag = (lk - lq)[:, None, None]
    if causal:
        allowed = allowed & (kj <= qi + diag)
    if window_left >= 0:
        allowed = allowed & (kj >= qi + diag - window_left)
    return allowed


def _isolate(kp: torch.Tensor, vp: torch.Tensor, k_valid: torch.Tensor, hidden_keys: bool):
    """With ``hidden_keys`` (a valid key is masked from a valid row of its own sequence: causal
    prefill, a window), zero in place the non-finite values of freshly gathered kp/vp
    ``[B, Mk, Hkv, D]`` and return ``bad`` ``[B, Mk, Hkv]``, the valid key rows that held one
    (so that the rows that see them can be made NaN); else None and nothing to do.

    A row is flagged when its float32 sum is not finite: every NaN/Inf is, and so is a finite
    row summing past 3.4e38 (whose scores would overflow anyway). One sum and one nan_to_num_
    per tile: 0.3 + 0.4 ms where isfinite().all() took 13 ms (one CPU thread, 2M fp32).
    """
    if not hidden_keys:
        return None
    finite = torch.isfinite(kp.sum(-1, dtype=torch.float32) + vp.sum(-1, dtype=torch.float32))
    kp.nan_to_num_(0.0, 0.0, 0.0)  # a select, not a product: 0 * NaN would stay NaN
    vp.nan_to_num_(0.0, 0.0, 0.0)
    return k_valid[:, :, None] & ~finite


def sees_bad(allowed: torch.Tensor, bad: torch.Tensor, h: int) -> torch.Tensor:
    """``[B, Mq, H]`` bool: the query row and head sees a ``bad`` key ``[B, Mk, Hkv]``."""
    b, mq = allowed.shape[0], allowed.shape[1]
    hkv = bad.shape[2]
    seen = torch.bmm(allowed.float(), bad.float()) > 0  # [B, Mq, Hkv]: count of bad keys seen
    return seen[:, :, :, None].expand(b, mq, hkv, h // hkv).reshape(b, mq, h)


def poison_rows(o: torch.Tensor, allowed: torch.Tensor, bad: torch.Tensor | None) -> torch.Tensor:
    """NaN, in place, in every row and head of a fresh o ``[B, Mq, H, D]`` that sees a ``bad``
    key ``[B, Mk, Hkv]``; returns o. In place: a new 8M-element CPU tensor costs a page-faulting
    allocation (70 ms at [4, 512, 32, 128] fp32 on the loaded 2-core CI host)."""
    if bad is None:
        return o
    return o.masked_fill_(sees_bad(allowed, bad, o.shape[2])[..., None], float("nan"))


def _scatter_tokens(o: torch.Tensor, cu: torch.Tensor, total: int,
                    fill: float = 0.0) -> torch.Tensor:
    """Inverse of the padding gather: token row t of ``[total, H, ...]`` takes ``o[b, t - cu[b]]``.

    Rows past ``cu[-1]`` (tokens owned by no sequence) are ``fill`` (zero; -inf for an lse).
    """
    b, mq = o.shape[0], o.shape[1]
    t = torch.arange(total, device=o.device, dtype=torch.int64)
    seq = torch.searchsorted(cu[1:].to(torch.int64), t, right=True)  # sequence that owns row t
    owned = seq < b
    seq = seq.clamp(max=b - 1)
    pos = (t - cu.to(torch.int64).index_select(0, seq)).clamp(0, mq - 1)
    if o.is_contiguous():  # index_select: 3x faster than advanced indexing (8 vs 25 ms)
        # reshape, not view: under compile the strides seen here may be a fake kernel's
        out = o.reshape(b * mq, *o.shape[2:]).index_select(0, seq * mq + pos)
    else:  # a transposed SDPA output: advanced indexing reads it in place (53 vs 114 ms)
        out = o[seq, pos]
    return out.masked_fill_(~owned.reshape(-1, *([1] * (out.dim() - 1))), fill)


def prefill_tiles(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                  block_table, window_left, k_scale=None, v_scale=None) -> Tiles | None:
    """Padded tiles of a prefill call, or None when it has no work (output all zeros).

    Keys are dense rows of k/v by ``cu_seqlens_k``, or the first lk tokens of each sequence
    through ``block_table`` when k/v are the paged caches. FP8 k/v (with scales) come out as
    float32 ``x * scale``.
    """
    b = cu_seqlens_q.shape[0] - 1
    if b == 0 or max_seqlen_q == 0 or max_seqlen_k == 0 or q.shape[0] == 0 or k.numel() == 0:
        return None  # no row sees a key (an empty k or cache can hold none)
    q_rows, q_valid, lq = _padded_rows(cu_seqlens_q, max_seqlen_q, q.shape[0])
    if block_table is None:
        k_rows, k_valid, lk = _padded_rows(cu_seqlens_k, max_seqlen_k, k.shape[0])
    else:
        lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int64)
        k_rows, k_valid = _paged_rows(block_table, lk, max_seqlen_k, k.shape[1])
    read = _gather if block_table is None else read_slots
    kp = dequantize(read(k, k_rows), k_scale)
    vp = dequantize(read(v, k_rows), v_scale)
    bad = _isolate(kp, vp, k_valid, hidden_keys=causal or window_left >= 0)
    allowed = allowed_pairs(q_valid, k_valid, lq, lk, causal, window_left)
    return Tiles(_gather(q, q_rows), kp, vp, allowed, bad)


def decode_tiles(q, k_cache, v_cache, seqlens_k, block_table, window_left, k_scale=None,
                 v_scale=None) -> Tiles | None:
    """Padded tiles of a decode call (one query per sequence, ``Mq = 1``), or None: no work."""
    b = q.shape[0]
    block_size = k_cache.shape[1]
    max_len = block_table.shape[1] * block_size
    if b == 0 or max_len == 0 or k_cache.numel() == 0:
        return None
    lk = seqlens_k.to(torch.int64)
    slots, k_valid = _paged_rows(block_table, lk, max_len, block_size)
    kp = dequantize(read_slots(k_cache, slots), k_scale)
    vp = dequantize(read_slots(v_cache, slots), v_scale)
    # The query is the last token: causality hides nothing from it, only a window does.
    bad = _isolate(kp, vp, k_valid, hidden_keys=window_left >= 0)
    ones = torch.ones(b, 1, dtype=torch.bool, device=q.device)
    allowed = allowed_pairs(ones, k_valid, torch.ones_like(lk), lk, True, window_left)
    return Tiles(q[:, None], kp, vp, allowed, bad)


# ---------------------------------------------------------------------------------------------
# prefill / decode
# ---------------------------------------------------------------------------------------------

def _attend(tiles: Tiles, scale: float, softcap: float,
            sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention on padded tiles: ``(o [B, Mq, H, D], lse [B, Mq, H])``, float32.

    lse is the natural log of the row's softmax denominator, ``exp(sinks[h])`` included; a row
    that sees no key has ``o = 0`` and ``lse = -inf`` (its sink, which has no value, is dropped
    too, so that merging it with another part cannot count a sink twice).
    """
    qp, kp, vp, allowed = tiles.q, tiles.k, tiles.v, tiles.allowed
    b, mq, h, d = qp.shape
    hkv = kp.shape[2]
    g = h // hkv
    q5 = qp.float().reshape(b, mq, hkv, g, d)
    s = torch.einsum("bqkgd,bskd->bkgqs", q5, kp.float()) * scale  # [B, Hkv, G, Mq, Mk]
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed[:, None, None], float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    sees = allowed.any(dim=-1)[:, None, None, :, None]  # [B, 1, 1, Mq, 1]
    if sinks is not None:
        sink = sinks.float().reshape(1, hkv, g, 1, 1)
        row_max = torch.where(sees, torch.maximum(row_max, sink), row_max)
    p = torch.exp(s - row_max)  # exactly 0 where masked
    denom = p.sum(dim=-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.where(sees, torch.exp(sink - row_max), 0.0)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    o = torch.einsum("bkgqs,bskd->bqkgd", p, vp.float()).reshape(b, mq, h, d)
    # A row that sees no key multiplied zeros by padding, which may be anything: select zeros.
    o = o.masked_fill_(~allowed.any(dim=-1)[:, :, None, None], 0.0)
    # denom == 0 exactly when no key is seen; a NaN denominator stays NaN (never -inf).
    lse = torch.where(denom == 0, float("-inf"), row_max + torch.log(denom))
    lse = lse[..., 0].permute(0, 3, 1, 2).reshape(b, mq, h, 1)
    return poison_rows(o, allowed, tiles.bad), poison_rows(lse, allowed, tiles.bad)[..., 0]


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
            causal: bool = True, block_table: torch.Tensor | None = None, window_left: int = -1,
            softcap: float = 0.0, sinks: torch.Tensor | None = None,
            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
            return_lse: bool = False):
    """Varlen attention. q ``[Tq, H, D]``; k/v ``[Tk, Hkv, D]`` or paged caches. Out ``[Tq, H, D]``
    (and lse ``[Tq, H]`` float32 with ``return_lse``)."""
    tiles = prefill_tiles(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                          block_table, window_left, k_scale, v_scale)
    if tiles is None:
        return _nothing_seen(q, return_lse)
    o, lse = _attend(tiles, scale, softcap, sinks)
    out = _scatter_tokens(o, cu_seqlens_q, q.shape[0]).to(q.dtype)
    if not return_lse:
        return out
    return out, _scatter_tokens(lse, cu_seqlens_q, q.shape[0], float("-inf"))


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens_k: torch.Tensor,
           block_table: torch.Tensor, scale: float, window_left: int = -1,
           softcap: float = 0.0, sinks: torch.Tensor | None = None,
           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
           return_lse: bool = False):
    """One query per sequence. q ``[B, H, D]``; caches paged; seqlens_k ``[B]``. Out ``[B, H, D]``
    (and lse ``[B, H]`` float32 with ``return_lse``)."""
    tiles = decode_tiles(q, k_cache, v_cache, seqlens_k, block_table, window_left, k_scale,
                         v_scale)
    if tiles is None:
        return _nothing_seen(q, return_lse)
    o, lse = _attend(tiles, scale, softcap, sinks)
    out = o[:, 0].to(q.dtype)
    return (out, lse[:, 0]) if return_lse else out


def _nothing_seen(q: torch.Tensor, return_lse: bool):
    """The result of a call in which no row sees a key: zeros (and an lse of -inf)."""
    out = torch.zeros_like(q)
    if not return_lse:
        return out
    return out, torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)


# ---------------------------------------------------------------------------------------------
# merge_states
# ---------------------------------------------------------------------------------------------

def merge_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                 lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over two disjoint key sets from each part's normalised output and lse.

    out_a/out_b ``[N, H, D]``, lse_a/lse_b float32 ``[N, H]``. With ``m = max(lse_a, lse_b)``:
    ``lse = m + log(e^(lse_a - m) + e^(lse_b - m))`` and ``out = sum_x e^(lse_x - lse) out_x``.
    A part with lse ``-inf`` saw no key and is not read (a select, so NaN there cannot leak);
    both ``-inf`` give zeros and ``-inf``; a NaN lse makes the row NaN.
    """
    a_empty, b_empty = lse_a == float("-inf"), lse_b == float("-inf")
    both = a_empty & b_empty
    m = torch.where(both, 0.0, torch.maximum(lse_a, lse_b))
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    denom = wa + wb
    lse = torch.where(both, float("-inf"), m + torch.log(denom))
    ca = torch.where(a_empty, 0.0, wa / denom)[..., None]
    cb = torch.where(b_empty, 0.0, wb / denom)[..., None]
    out = torch.where(a_empty[..., None], 0.0, ca * out_a.float()) + \
        torch.where(b_empty[..., None], 0.0, cb * out_b.float())
    return out.to(out_a.dtype), lse
