"""The call adapters: one op function per (provider, op, paged, LSE) built once by :func:`bind`.

Everything that depends only on the call signature (provider, entry point, window, softcap,
keyword options, which fix-ups are needed) is decided in :func:`bind`; the function it returns
makes the kernel call and only the fix-ups the provider needs:

* FA3 (``fa3``, ``fa3_fwd``) writes output 0 and LSE -inf itself for a row that sees no key
  (``store_zero`` of tiles without keys; ``finalize`` of fully masked rows; the split-KV combine of
  all-empty splits). It leaves rows past ``cu_seqlens_q[-1]`` unwritten, so prefill hands FA3 one
  extra sequence ``[cu_seqlens_q[-1], Tq)`` with no key: its sm90 varlen path uses the persistent
  scheduler, which counts each sequence's m-blocks from ``cu_seqlens_q`` (not ``max_seqlen_q``),
  so FA3 itself zeroes the padded tail. Cost: one ``cat`` of B + 2 int32 values per call, no pass
  over the output (the previous ``torch.where`` read and wrote it once: ~67 us of 952 at 4 x 4096,
  32 heads, on an H200).
* FA2 and aten leave rows past ``cu_seqlens_q[-1]`` unwritten, give LSE +inf to rows without a
  key, and do not promise a finite split-KV decode row without a key: those are selected with
  ``torch.where`` (one pass over the output, as before).

LSE comes back from the kernels as float32 ``[H, total_q]`` (varlen) or ``[B, H, 1]`` (one query
per sequence) in natural log units; the contract's is ``[Tq, H]`` / ``[B, H]``, contiguous (the
ops' fake kernels promise contiguous outputs to the compiler).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attn_ops.contract import OpConfig
from attn_ops.backends.flash.providers import Provider

_INF = float("inf")
_consts: dict = {}  # (what, device, n) -> a small device constant, see _const


def _const(what: str, device: torch.device, n: int) -> torch.Tensor:
    """An int32 device constant: ``"end"``: ``[n]``; ``"iota"``: ``arange(n)``. Made once per
    (device, n), except while a CUDA graph is being captured (a tensor made there holds its value
    only during replays), when it is made for this call only."""
    key = (what, device, n)
    t = _consts.get(key)
    if t is None:
        if what == "end":
            t = torch.full((1,), n, dtype=torch.int32, device=device)
        else:
            t = torch.arange(n, dtype=torch.int32, device=device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            if len(_consts) >= 256:
                _consts.clear()
            _consts[key] = t
    return t


def _int32(block_table: torch.Tensor) -> torch.Tensor:
    """FlashAttention reads int32 block tables with a contiguous last dim."""
    return block_table.to(torch.int32).contiguous()


def window_of(causal: bool, window_left: int) -> tuple[int, int]:
    """The contract's window as FlashAttention's (left, right): right 0 when causal, else -1."""
    return (window_left, 0 if causal else -1) if window_left >= 0 else (-1, -1)


def _options(window: tuple, softcap: float, **kw) -> dict:
    """Keyword options, naming window/softcap only when set (older builds lack the names)."""
    if window != (-1, -1):
        kw["window_size"] = window
    if softcap > 0:
        kw["softcap"] = softcap
    return kw


def nothing_seen(q: torch.Tensor, with_lse: bool):
    """The result of a call in which no row sees a key: zeros (and an LSE of -inf)."""
    out = torch.zeros_like(q)
    if not with_lse:
        return out
    return out, torch.full(q.shape[:2], -_INF, dtype=torch.float32, device=q.device)


def _fa3_tail(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int):
    """``(cu_seqlens_q, cu_seqlens_k)`` with one more sequence: rows ``[cu_q[-1], total_q)``
    over no key, which FA3 writes as zeros (and LSE -inf). One ``cat``, no host sync."""
    n = cu_q.shape[0] + 1
    ext = torch.cat((cu_q, _const("end", cu_q.device, total_q), cu_k, cu_k[-1:]))
    return ext[:n], ext[n:]


def _lse_rows(lse: torch.Tensor) -> torch.Tensor:
    """FlashAttention's varlen LSE ``[H, total_q]`` as the contract's ``[total_q, H]``."""
    if lse.dim() != 2:  # flash-attn < 2.5-era builds padded it to [B, H, max_seqlen_q]
        raise RuntimeError(f"flash backend: this FlashAttention build returned a softmax LSE "
                           f"of shape {tuple(lse.shape)}; the varlen layout [H, total_q] is "
                           f"needed for prefill_with_lse (use the triton backend)")
    return lse.t().contiguous()


# ---------------------------------------------------------------------------------------------
# bind: the op function for one signature
# ---------------------------------------------------------------------------------------------

def bind(p: Provider, config: OpConfig):
    """The prefill/decode function (the op's signature, ``return_lse`` accepted and ignored:
    ``config.with_lse`` decides) that runs ``config`` on provider ``p``."""
    window = window_of(config.causal if config.op == "prefill" else True, config.window_left)
    lse = config.with_lse
    if config.op == "decode":
        return _bind_decode(p, window, config.softcap, lse)
    if p.family == "fa3":
        if config.paged:
            return _bind_fa3_paged(p.module, config.causal, window, config.softcap, lse)
        return _bind_fa3_dense(p, config.causal, window, config.softcap, lse)
    return _bind_fa2_prefill(p, config.causal, window, config.softcap, lse)


def _bind_fa3_dense(p: Provider, causal: bool, window: tuple, softcap: float, lse: bool):
    fwd = p.raw_fwd
    if fwd is not None:  # the compiled op, positional q/k/v as the Python wrapper passes them
        static = dict(is_causal=causal, window_size_left=window[0],
                      window_size_right=window[1], softcap=softcap, num_splits=1)

        def kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale):
            res = fwd(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                      max_seqlen_k=max_k, softmax_scale=scale, **static)
            return res[0], res[1]
    else:
        varlen = p.module.flash_attn_varlen_func
        kw = _options(window, softcap, causal=causal)
        if lse:
            kw["return_attn_probs"] = True

        def kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale):
            res = varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, **kw)
            return (res[0], res[1]) if isinstance(res, (tuple, list)) else (res, None)

    def prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                causal=True, block_table=None, window_left=-1, softcap=0.0, return_lse=False):
        if max_seqlen_q == 0 or max_seqlen_k == 0 or q.shape[0] == 0:
            return nothing_seen(q, lse)
        cu_q, cu_k = _fa3_tail(cu_seqlens_q, cu_seqlens_k, q.shape[0])
        out, softmax_lse = kernel(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale)
        return (out, _lse_rows(softmax_lse)) if lse else out
    return prefill


def _bind_fa3_paged(mod, causal: bool, window: tuple, softcap: float, lse: bool):
    kvcache = mod.flash_attn_with_kvcache
    kw = _options(window, softcap, causal=causal)
    if lse:
        kw["return_softmax_lse"] = True

    def prefill(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                scale, causal=True, block_table=None, window_left=-1, softcap=0.0,
                return_lse=False):
        if max_seqlen_q == 0 or max_seqlen_k == 0 or q.shape[0] == 0:
            return nothing_seen(q, lse)
        # The tail sequence: cu_seqlens_q ends at Tq, no cached key, a (never read) page row.
        n = cu_seqlens_q.shape[0] + 1
        ext = torch.cat((cu_seqlens_q, _const("end", q.device, q.shape[0]),
                         cu_seqlens_k.diff(), cu_seqlens_q[:1]))  # cu_seqlens_q[0] == 0
        table = F.pad(_int32(block_table), (0, 0, 0, 1))
        res = kvcache(q, k_cache, v_cache, cache_seqlens=ext[n:], page_table=table,
                      cu_seqlens_q=ext[:n], max_seqlen_q=max_seqlen_q, softmax_scale=scale, **kw)
        if not lse:
            return res[0] if isinstance(res, (tuple, list)) else res
        return res[0], _lse_rows(res[1])
    return prefill


# ---------------------------------------------------------------------------------------------
# FA2 and aten prefill
# ---------------------------------------------------------------------------------------------

def _aten_flash_forward():
    """``aten::_flash_attention_forward`` (a function, so CPU tests can stand in a fake)."""
    return torch.ops.aten._flash_attention_forward.default


def _aten_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, table, window, lens_k=None):
    kw = {"scale": scale}
    if window != (-1, -1):
        kw.update(window_size_left=window[0], window_size_right=window[1])
    if table is not None:  # torch documents block_table as requiring seqused_k (keys per seq)
        kw.update(block_table=table, seqused_k=lens_k)
    # Returns (output, logsumexp, rng_state, unused, debug_attn_mask).
    res = _aten_flash_forward()(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, **kw)
    return res[0], res[1]


def _bind_fa2_prefill(p: Provider, causal: bool, window: tuple, softcap: float, lse: bool):
    if p.name == "aten":
        def kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale, table):
            lens_k = None if table is None else cu_k.diff()
            return _aten_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, table, window,
                                 lens_k)
    else:
        varlen = p.module.flash_attn_varlen_func
        kw = _options(window, softcap, dropout_p=0.0, causal=causal)
        if lse:
            kw["return_attn_probs"] = True

        def kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale, table):
            extra = {} if table is None else {"block_table": table}
            res = varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, **kw, **extra)
            return (res[0], res[1]) if lse else (res, None)

    def prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                causal=True, block_table=None, window_left=-1, softcap=0.0, return_lse=False):
        if cu_seqlens_q.shape[0] <= 1 or max_seqlen_q == 0 or max_seqlen_k == 0 \
                or q.shape[0] == 0:
            return nothing_seen(q, lse)
        table = None if block_table is None else _int32(block_table)
        # FA2 treats max_seqlen_q == 1 with GQA as "one query per sequence, sequence b at row b"
        # and folds the query heads into rows: wrong when a sequence has no query or rows past
        # cu_seqlens_q[-1] exist. The bound only sizes the grid, so prefill passes at least 2.
        out, softmax_lse = kernel(q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
                                  max(max_seqlen_q, 2), max_seqlen_k, scale, table)
        # Rows past cu_seqlens_q[-1] are unwritten: select zeros there (one pass).
        owned = _const("iota", q.device, q.shape[0]) < cu_seqlens_q[-1]
        out = torch.where(owned[:, None, None], out, 0.0)
        if not lse:
            return out
        rows = _lse_rows(softmax_lse)
        # FA2 writes +inf for a row without a key; the contract's is -inf (NaN stays NaN).
        return out, torch.where(owned[:, None] & (rows != _INF), rows, -_INF)
    return prefill


# ---------------------------------------------------------------------------------------------
# decode (one query per sequence over the paged cache)
# ---------------------------------------------------------------------------------------------

def _bind_decode(p: Provider, window: tuple, softcap: float, lse: bool):
    if p.name == "aten":
        def kernel(q, k_cache, v_cache, seqlens_k, table, scale):
            # Each sequence is one query row: cu_seqlens_q = 0..B; key lengths as cumulative
            # offsets (seqused_k carries them to the paged kernel).
            cu_q = _const("iota", q.device, q.shape[0] + 1)
            cu_k = F.pad(torch.cumsum(seqlens_k, 0, dtype=torch.int32), (1, 0))
            max_k = table.shape[1] * k_cache.shape[1]
            out, softmax_lse = _aten_forward(q, k_cache, v_cache, cu_q, cu_k, 1, max_k, scale,
                                             True, table, window, seqlens_k)
            return out, (softmax_lse.t() if lse else None)
    else:
        kvcache = p.module.flash_attn_with_kvcache
        kw = _options(window, softcap, causal=True)
        if lse:
            kw["return_softmax_lse"] = True
        table_key = "page_table" if p.family == "fa3" else "block_table"  # FA3 / FA2 names

        def kernel(q, k_cache, v_cache, seqlens_k, table, scale):
            res = kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=seqlens_k,
                          softmax_scale=scale, **{table_key: table}, **kw)
            if not lse:
                res = res[0] if isinstance(res, (tuple, list)) else res
                return res[:, 0], None
            return res[0][:, 0], res[1][:, :, 0]  # lse [B, H, 1] -> [B, H]
    fix = p.family != "fa3"  # FA3 writes 0 / -inf for seqlens_k == 0 itself

    def decode(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left=-1, softcap=0.0,
               return_lse=False):
        if q.shape[0] == 0 or block_table.shape[1] == 0:
            return nothing_seen(q, lse)
        out, softmax_lse = kernel(q, k_cache, v_cache, seqlens_k.contiguous(),
                                  _int32(block_table), scale)
        if fix:
            seen = seqlens_k > 0
            out = torch.where(seen[:, None, None], out, 0.0)
            if lse:  # +inf (non-split) or anything (split) for an empty row: -inf
                softmax_lse = torch.where(seen[:, None], softmax_lse, -_INF).contiguous()
        elif lse:
            softmax_lse = softmax_lse.contiguous()
        return (out, softmax_lse) if lse else out
    return decode
