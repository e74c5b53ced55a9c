"""sdpa backend: PyTorch's fused ``F.scaled_dot_product_attention``, any device: on views of
q/k/v for a dense CPU prefill, on cache views or whole blocks for a CPU decode, else on padded
tiles.

The fast pure-torch backend, and "auto"'s choice on CPU. Variable-length and paged batches are
gathered into padded ``[B, H, max_len, D]`` tiles exactly as the reference does (same helpers),
and the contract's mask (padding, bottom-right causal, window) goes to SDPA as one boolean
``[B, 1, Mq, Mk]`` mask, so PyTorch's fused kernels do the softmax(QK^T)V with fp32 accumulation
and never materialise fp32 scores the way the reference oracle does. On a 2-layer CPU model at
S=1024 the reference was 9.6x slower than Inductor's own SDPA (benchmarks/bench_substitution.py);
this backend removes that gap. No softcap (SDPA has none): ``supports`` says so.

Rows that see no key come out of SDPA as NaN (softmax of an empty row); they are zeroed with
a select, as the contract requires, with no host sync. SDPA adds the mask to the scores, so a
masked NaN/Inf key would still reach its row (``NaN + -inf = NaN``) and a masked value through
``0 * NaN``: the shared tiles (:class:`~attn_ops.backends.reference.Tiles`) pad each sequence
with its own last token and zero non-finite keys hidden by causality or a window, and rows that
see a non-finite key or value come out NaN, as on the reference.

Dense CPU batches take no tiles (:func:`_dense_prefill`): when every sequence holds exactly
``max_seqlen`` tokens (``cu_seqlens[-1]`` read on the host, free for CPU tensors), the THD q/k/v
are free ``[B, S, H, D]`` views and one call of PyTorch's fused CPU kernel on their transposes
does the work, with ``is_causal`` (so it skips the blocks above the diagonal) and native GQA,
writing a ``[B, S, H, D]`` output that is the ``[Tq, H, D]`` result. That is what a substituted
model's cache-free prefill calls (graph_passes/rewrite/dense_prefill.py). Its cost over the bare
kernel is the op's host path plus one sum over v (and k with a mask) for the non-finite rule:
on the 2-layer benchmark model (hidden 256, one thread) the sum costs ~2.5% of the forward at
S = 128 and ~0.5% at S = 512.

A decode of CPU tensors takes no tiles either (:func:`_host_decode`): lengths and block ids are
read on the host, the keys are a strided view of the cache where each sequence's span lies in
one block at ids in arithmetic progression (a dense cache viewed as paged, the cache
substitution's decode), else one ``index_select`` of whole blocks; a key mask only where the
sequences see different spans; the gathered blocks go to a buffer each thread keeps
(:func:`_gather_blocks`). At bf16, H 32, Hkv 8, D 128, one thread, through the op (development
CPU, 2026-12-01): B 1 over 16 tokens 37 us, B 4 over 1024 tokens 2.1 ms as a view, 2.9 ms in
pages of 16 (9.6-9.9 ms in some processes before the kept buffer), against 20 us / 1.7 ms for
F.scaled_dot_product_attention on the dense slice (GQA folded; 85 us / 22 ms with enable_gqa)
(benchmarks/bench_overhead.py --cpu-defaults, results/overhead_cpu_defaults_twenty_second_pass.csv).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from attn_ops.backends.reference import (Tiles, _on_host, _scatter_tokens, decode_tiles,
                                         prefill_tiles, sees_bad, store_kvcache)

name = "sdpa"

__all__ = ["name", "supports", "store_kvcache", "prefill", "decode"]


def supports(config) -> str | None:
    """None when this backend can run the call ``config`` (an ``OpConfig``) describes, else why."""
    if config.op == "store_kvcache":
        return None  # the reference's vectorised index_copy_ (no SDPA involved)
    if config.op not in ("prefill", "decode"):
        return f"{config.op} is not an attention call (the reference and triton backends run it)"
    if config.with_lse:
        return "F.scaled_dot_product_attention does not return the log-sum-exp"
    if config.has_sinks:
        return "attention sinks are not expressible through F.scaled_dot_product_attention"
    if config.fp8_cache:
        return ("F.scaled_dot_product_attention takes no float8_e4m3fn keys/values with "
                "fp16/bf16 queries (no dequantising scales)")
    if config.softcap > 0:
        return "softcap is not expressible through F.scaled_dot_product_attention"
    return None


def _attend(tiles: Tiles, scale: float) -> torch.Tensor:
    """Tiles (q ``[B, Mq, H, D]``, k/v ``[B, Mk, Hkv, D]``) -> ``[B, Mq, H, D]`` in q's dtype."""
    qp, kp, vp, allowed = tiles.q, tiles.k, tiles.v, tiles.allowed
    o = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),
                                       attn_mask=allowed[:, None], scale=scale,
                                       enable_gqa=qp.shape[2] != kp.shape[2])
    # In place on SDPA's fresh [B, H, Mq, D] output (a new tensor costs a page-faulting
    # allocation on the CPU); then a [B, Mq, H, D] view for the caller.
    o.masked_fill_(~allowed.any(dim=-1)[:, None, :, None], 0.0)
    if tiles.bad is not None:
        seen = sees_bad(allowed, tiles.bad, o.shape[1])  # [B, Mq, H]
        o.masked_fill_(seen.transpose(1, 2)[..., None], float("nan"))
    return o.transpose(1, 2)


# PyTorch's fused CPU kernel, which Inductor itself calls for SDPA on the CPU. Called directly
# (not through F.scaled_dot_product_attention's choice) because the fast path relies on how it
# applies is_causal: it writes -inf over the scores above the diagonal rather than adding a
# mask, so a non-finite key hidden by causality never reaches a row (tests pin it).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _last(cu: torch.Tensor) -> int:
    """``cu[-1]`` of a host tensor: through ``tolist`` for a short one (one call, ~13 us with the
    caches cold after a matmul, where ``int(cu[-1])`` took 45: a select and an item)."""
    return cu.tolist()[-1] if cu.shape[0] <= 64 else int(cu[-1])


def _is_dense(q, k, cu_q, cu_k, mq: int, mk: int) -> bool:
    """Every sequence has exactly ``mq`` queries and ``mk`` keys, read on the host (CPU only).

    The shapes say ``Tq == B * mq`` and ``Tk == B * mk``; the lengths are at most the
    ``max_seqlen`` bounds (a contract precondition) and sum to ``cu[-1]``, so ``cu[-1] == T``
    leaves no length short of its bound. Shapes alone cannot say it (``cu_q = [0, 2, 4]`` with
    ``Tq = 8``, ``mq = 4`` is two sequences of 2 and 4 rows owned by none), so the last offsets
    are read: free for plain CPU tensors outside tracing (no device to wait for; a traced call
    runs the fake kernel). Other devices take the tiles (there a read would be a device sync).
    """
    b = cu_q.shape[0] - 1
    if b <= 0 or mq <= 0 or mk <= 0 or q.shape[0] != b * mq or k.shape[0] != b * mk:
        return False
    if not (_on_host(q) and _on_host(cu_q) and _on_host(cu_k)):
        return False
    return _last(cu_q) == q.shape[0] and (cu_k is cu_q or _last(cu_k) == k.shape[0])


def _finite(x: torch.Tensor) -> bool:
    """No NaN/Inf in x (a host read: CPU only). One sum: every NaN/Inf makes it non-finite, and
    so does a finite tensor summing past the dtype's range (then the caller merely takes a
    slower path). fp16 sums in fp32 (its range ends at 65504); fp32/bf16 in their own dtype:
    ``sum(dtype=float32)`` of an fp32 tensor took 78 us against 33 with the caches cold."""
    total = x.sum(dtype=torch.float32) if x.dtype == torch.float16 else x.sum()
    return math.isfinite(total.item())  # .item(): 20 us less than float(tensor) (cold)


def _dense_prefill(q, k, v, cu_q, cu_k, mq, mk, scale, causal, window_left):
    """The prefill of a dense batch on views (no gather, no scatter, no copy), or None.

    q ``[B * mq, H, D]``, k/v ``[B * mk, Hkv, D]`` (any strides with a contiguous last dim) are
    viewed as ``[B, S, H, D]`` and transposed for the kernel; its output, allocated in q's
    ``[B, mq, H, D]`` memory order, reshapes to ``[Tq, H, D]`` as a view. Square causal goes as
    ``is_causal`` (top-left = bottom-right when mq == mk): the CPU kernel skips the blocks above
    the diagonal, about half the work at long lengths; a bottom-right causal with mq < mk, or a
    window, as one ``[mq, mk]`` boolean mask shared by the batch. Every row sees a key.

    Isolation (a key hidden from a row must not reach it, even NaN/Inf): with keys hidden
    inside a sequence, the kernel still multiplies the zero weights of a hidden block's values
    (``0 * NaN`` in ``p @ v`` inside the diagonal block), and an added mask lets a hidden
    non-finite score through (``NaN + -inf``). So the values (and with a mask the keys too) are
    checked by one sum each, a read of O(Tk * Hkv * D) against the O(mq * mk) attention; when
    one is not finite (rare) the tiles run, which isolate it.
    """
    if _FLASH_CPU is None or not _is_dense(q, k, cu_q, cu_k, mq, mk):
        return None
    masked = window_left >= 0 or (causal and mq != mk)
    if (causal or window_left >= 0) and mq > mk:
        return None  # rows that see no key: the tiles zero them
    if masked and not (_finite(k) and _finite(v)):
        return None
    if causal and not masked and mq > 1 and not _finite(v):
        return None
    b, h, d = cu_q.shape[0] - 1, q.shape[1], q.shape[2]
    mask = None
    if masked:
        qi = torch.arange(mq, device=q.device)[:, None] + (mk - mq)  # query i is token i+mk-mq
        kj = torch.arange(mk, device=q.device)[None, :]
        keep = kj >= qi - window_left if window_left >= 0 else None
        if causal:
            keep = kj <= qi if keep is None else keep & (kj <= qi)
        # The kernel takes an additive mask of q's dtype.
        mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
    o = _FLASH_CPU(_heads_major(q, b, mq), _heads_major(k, b, mk), _heads_major(v, b, mk), 0.0,
                   causal and not masked, attn_mask=mask, scale=scale)[0]  # [B, H, mq, D]
    if o.stride() == (mq * h * d, d, h * d, 1):  # the kernel wrote [B, mq, H, D] (q's order)
        return o.as_strided((b * mq, h, d), (h * d, d, 1))
    return o.transpose(1, 2).reshape(b * mq, h, d)


def _heads_major(x: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """``x [B * s, heads, D]`` as the ``[B, heads, s, D]`` view SDPA takes: one as_strided (a
    view and a transpose cost 20 us more per call of 3, with the caches cold after a matmul)."""
    st = x.stride()
    return x.as_strided((b, x.shape[1], s, x.shape[2]), (s * st[0], st[1], st[0], st[2]),
                        x.storage_offset())


def prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal=True,
            block_table=None, window_left=-1, softcap=0.0):
    """As :func:`attn_ops.prefill`: q ``[Tq, H, D]`` -> ``[Tq, H, D]``."""
    if block_table is None:
        out = _dense_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             scale, causal, window_left)
        if out is not None:
            return out
    tiles = prefill_tiles(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                          block_table, window_left)
    if tiles is None:
        return torch.zeros_like(q)
    return _scatter_tokens(_attend(tiles, scale), cu_seqlens_q, q.shape[0])


def _attend_decode(tiles: Tiles, scale: float) -> torch.Tensor:
    """Decode tiles (q ``[B, 1, H, D]``) -> ``[B, H, D]``, the G = H / Hkv query heads of a kv
    head folded into G query rows of it: SDPA runs one ``[G, Mk]`` problem per kv head instead
    of G ``[1, Mk]`` ones through ``enable_gqa``. At H=32, Hkv=8, D=128 and 256 keys on one CPU
    thread: bf16 1.75 -> 0.15 ms, fp32 0.22 -> 0.12 ms. One query row per sequence, so the
    ``[B, 1, 1, Mk]`` mask serves every folded row."""
    qp, kp, vp, allowed = tiles.q, tiles.k, tiles.v, tiles.allowed  # allowed [B, 1, Mk]
    b, _, h, d = qp.shape
    hkv = kp.shape[2]
    o = F.scaled_dot_product_attention(qp.reshape(b, hkv, h // hkv, d), kp.transpose(1, 2),
                                       vp.transpose(1, 2), attn_mask=allowed[:, None],
                                       scale=scale)  # [B, Hkv, G, D]
    o = o.reshape(b, h, d)
    o = o.masked_fill(~allowed.any(dim=-1)[:, :, None], 0.0)  # [B, 1, 1]: no key, zeros
    if tiles.bad is not None:
        o.masked_fill_(sees_bad(allowed, tiles.bad, h)[:, 0, :, None], float("nan"))
    return o


def _key_range(lens: list[int], window_left: int):
    """Per sequence the first key its query sees (``lo``), and over the batch's non-empty
    sequences the smallest ``lo`` and the largest length: the key span ``[start, end)`` that one
    SDPA call over all sequences must cover."""
    los = [max(n - 1 - window_left, 0) for n in lens] if window_left >= 0 else [0] * len(lens)
    seen = [(lo, n) for lo, n in zip(los, lens) if n > 0]
    return los, min(lo for lo, _ in seen), max(n for _, n in seen)


def _progression(blocks: list[int], lens: list[int], num_blocks: int):
    """``(first, step)`` when the non-empty sequences' blocks are ``first + step * b``
    (``step >= 1``, every such row inside the cache: an empty sequence's row is read but its
    output zeroed), else None. A dense cache viewed as paged (``arange(B)``) is one."""
    used = [(b, x) for b, (x, n) in enumerate(zip(blocks, lens)) if n > 0]
    b0, x0 = used[0]
    step = 1 if len(used) == 1 else (used[1][1] - x0) // (used[1][0] - b0)
    first = x0 - step * b0
    if step < 1 or first < 0 or first + step * (len(blocks) - 1) >= num_blocks or \
            any(x != first + step * b for b, x in used):
        return None
    return first, step


def _block_view(cache: torch.Tensor, first: int, step: int, b: int, start: int, end: int):
    """Tokens ``[start, end)`` of blocks ``first + step * i``, i < b: a ``[b, end - start, Hkv,
    D]`` view of ``cache [N, bs, Hkv, D]`` (any strides): metadata only, no copy."""
    st = cache.stride()
    return cache.as_strided((b, end - start, cache.shape[2], cache.shape[3]),
                            (step * st[0], st[1], st[2], st[3]),
                            cache.storage_offset() + first * st[0] + start * st[1])


def _hidden(los: list[int], lens: list[int], start: int, end: int):
    """The ``(b, from, to)`` spans of the ``[B, end - start]`` key tile that a non-empty
    sequence's query does not see (before its window, past its length)."""
    spans = []
    for b, (lo, n) in enumerate(zip(los, lens)):
        if n > 0 and lo > start:
            spans.append((b, 0, lo - start))
        if 0 < n < end:
            spans.append((b, n - start, end - start))
    return spans


# A CPU decode over scattered pages gathers its K and V blocks into tiles of the batch's key span.
# Allocated anew per call, a tile of megabytes can come from the OS every time (glibc hands such
# blocks back when they are freed, depending on what else the process holds), and then each call
# page-faults it in: B 4 x 1024 tokens in pages of 16, bf16, one thread, an 8 MB index_select took
# 3.1 ms against 0.27 and the decode 9.7 ms against 2.9, in one process of two
# (BENCHMARKS.md, twenty-second pass). So each thread keeps one buffer for both tiles, up to
# _GATHER_KEPT_BYTES (larger gathers allocate per call: their SDPA dwarfs the faults).
_GATHER_KEPT_BYTES = 64 << 20
_gathered = threading.local()


def _gather_blocks(caches, ids: torch.Tensor) -> list[torch.Tensor]:
    """``[cache.index_select(0, ids) for cache in caches]`` (caches of one dtype and shape),
    written into this thread's kept buffer when it fits; each call overwrites the last one's
    tiles (they live only inside one decode)."""
    shape = (ids.numel(), *caches[0].shape[1:])
    numel = math.prod(shape)
    nbytes = numel * caches[0].element_size() * len(caches)
    if nbytes > _GATHER_KEPT_BYTES or (torch.is_grad_enabled()
                                       and any(c.requires_grad for c in caches)):
        return [c.index_select(0, ids) for c in caches]
    buf = getattr(_gathered, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _gathered.buf = torch.empty(nbytes, dtype=torch.uint8)
    flat = buf[:nbytes].view(caches[0].dtype)
    return [torch.index_select(c, 0, ids, out=flat[i * numel:(i + 1) * numel].view(shape))
            for i, c in enumerate(caches)]


def _host_decode(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left):
    """The decode of plain CPU tensors with the lengths and block ids read on the host, or None.

    A host read of a CPU tensor waits on no device (the precedent: the dense prefill above and
    the reference's CPU store), and traced calls run the fake kernel, so the padded-tile gather
    (about 25 small ops, ~200 us at B 1 over 16 tokens, and a per-token index_select: 11 ms of
    17.5 at B 4 x 1024 tokens in pages of 16, bf16, one thread) is replaced by:

    * keys read once, over the batch's key span ``[start, end)`` (the window's first key to the
      longest length): when every non-empty sequence's span lies in its first block at a block
      id in arithmetic progression (a dense ``[B, Hkv, S, D]`` cache viewed as B blocks, one
      sequence: ``block_table`` of width 1), a strided view of the cache, no copy; else one
      ``index_select`` of whole blocks (a block's tokens are contiguous rows: 0.38 ms where the
      per-token index took 0.62 for the same 8 MB), entries a sequence does not own replaced by
      block 0;
    * one boolean ``[B, 1, 1, end - start]`` key mask from seqlens and the window, only when
      sequences differ in what they see; no mask when all see the same span (gpt-fast's step);
    * SDPA with the G query heads of a kv head folded into G query rows, as before.

    Isolation (SDPA adds the mask, so a hidden NaN/Inf key still reaches its row, a hidden value
    through ``0 * NaN``): a gathered tile is ours, and its hidden spans are zeroed (a few small
    writes per sequence that has one); a view is the cache itself, so its hidden spans are
    checked (one sum each, only where a sequence sees less than the span) and a non-finite one
    sends the call to the tiles. Keys a row sees take SDPA's arithmetic: a NaN one makes the
    row NaN. Sequences with no key get zeros.
    """
    if not (_on_host(q) and _on_host(seqlens_k) and _on_host(block_table)
            and type(k_cache) is torch.Tensor and type(v_cache) is torch.Tensor):
        return None
    b, h, d = q.shape
    num_blocks, bs, hkv = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    width = block_table.shape[1]
    if b == 0 or width == 0 or k_cache.numel() == 0 or h % hkv:
        return None
    lens = seqlens_k.tolist()  # B ints; a short list costs ~0.2 us
    if max(lens) <= 0:
        return torch.zeros_like(q)
    los, start, end = _key_range(lens, window_left)
    if end > width * bs or min(lens) < 0:
        return None  # outside the contract (the tiles clamp; ATTN_OPS_CHECK=1 raises)
    hidden = _hidden(los, lens, start, end)
    place = None
    if end <= bs:  # every span inside its sequence's first block
        place = _progression(block_table[:, 0].tolist(), lens, num_blocks)
    if place is not None:
        kp = _block_view(k_cache, *place, b, start, end)
        vp = _block_view(v_cache, *place, b, start, end)
        if hidden and not _finite(torch.stack([x[i, lo:hi].sum(dtype=torch.float32)
                                               for i, lo, hi in hidden for x in (kp, vp)])):
            return None  # a hidden non-finite key or value in the cache: the tiles isolate it
    else:
        c0, c1 = start // bs, (end - 1) // bs + 1
        ids = block_table[:, c0:c1]
        if any(lo // bs > c0 or (n - 1) // bs < c1 - 1 for lo, n in zip(los, lens)):
            col = torch.arange(c0, c1)
            first = torch.tensor([lo // bs if n > 0 else c1 for lo, n in zip(los, lens)])
            last = torch.tensor([(n - 1) // bs for n in lens])
            ids = ids.masked_fill((col < first[:, None]) | (col > last[:, None]), 0)
        ids = ids.reshape(-1)
        kp, vp = (g.view(b, (c1 - c0) * bs, hkv, d)[:, start - c0 * bs:end - c0 * bs]
                  for g in _gather_blocks((k_cache, v_cache), ids))
        for i, lo, hi in hidden:
            kp[i, lo:hi] = 0.0
            vp[i, lo:hi] = 0.0
    mask = None
    if hidden or min(lens) == 0:
        j = torch.arange(start, end)
        keep = j < seqlens_k[:, None]
        if window_left >= 0:
            keep &= j >= torch.tensor(los)[:, None]
        mask = keep[:, None, None]  # [B, 1, 1, end - start]: every folded row of a sequence
    o = F.scaled_dot_product_attention(q.reshape(b, hkv, h // hkv, d), kp.transpose(1, 2),
                                       vp.transpose(1, 2), attn_mask=mask, scale=scale)
    o = o.reshape(b, h, d)
    if min(lens) == 0:
        o.masked_fill_((seqlens_k == 0)[:, None, None], 0.0)
    return o


def decode(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left=-1, softcap=0.0):
    """As :func:`attn_ops.decode`: q ``[B, H, D]`` -> ``[B, H, D]``."""
    out = _host_decode(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left)
    if out is not None:
        return out
    tiles = decode_tiles(q, k_cache, v_cache, seqlens_k, block_table, window_left)
    if tiles is None:
        return torch.zeros_like(q)
    return _attend_decode(tiles, scale)
