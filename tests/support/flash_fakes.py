"""Stand-ins for the FlashAttention kernels, for CPU tests of the flash backend's call code.

They keep FlashAttention's calling conventions (window ``(left, right)``, causal forcing right =
0, int32 block tables and cu_seqlens, torch's "block_table requires seqused_k", FA2's fold of
GQA heads into rows when max_seqlen_q == 1, LSE ``[H, total_q]`` for varlen and ``[B, H, 1]``
for one query per sequence) and compute with the reference backend. What the real kernels write
for rows they do not own or do not promise is modelled as the sources say:

* FA3 (hopper/epilogue_fwd.hpp ``store_zero``, softmax.h ``finalize``, the combine kernel): a
  row that sees no key gets output 0 and LSE -inf; rows past ``cu_seqlens_q[-1]`` are not
  written. Its sm90 varlen scheduler counts m-blocks from ``cu_seqlens_q``, so every row a
  sequence owns is written whatever ``max_seqlen_q`` says.
* FA2 / aten (csrc flash_fwd_kernel.h): a row without a key gets output 0 and LSE +inf
  (non-split); a split-KV decode row without a key is not promised; rows past
  ``cu_seqlens_q[-1]`` are not written.

Unwritten / unpromised values are NaN here, so a missing fix-up in the backend shows as NaN.
"""

import importlib.machinery
import types

import torch

from attn_ops.backends import reference

NAN = float("nan")
INF = float("inf")


def _fa_mask(causal, window_size):
    left, right = window_size
    assert right in (-1, 0), f"right window {right}: the contract needs 0 (causal) or -1"
    return causal or right == 0, left


def _check_gqa_fold(q, num_kv_heads, cu_q, max_q, window_size):
    # FA2 folds GQA query heads into rows when max_seqlen_q == 1 and reads row b as sequence
    # b's only query: right only when cu_seqlens_q == 0..B.
    if max_q == 1 and q.shape[-2] > num_kv_heads and tuple(window_size) == (-1, -1):
        b = cu_q.shape[0] - 1
        assert torch.equal(cu_q.cpu(), torch.arange(b + 1, dtype=torch.int32)), "FA2 fold misread"


def _poison(t, rows, dim=0):
    t = t.clone()
    t.index_fill_(dim, rows.nonzero()[:, 0], NAN)  # what the kernel does not write or promise
    return t


def _fa_prefill(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window_size, softcap, table,
                family):
    """(out [T, H, D], lse [H, T]) as the ``family`` ("fa3"/"fa2") kernels leave them."""
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32
    assert cu_q.is_contiguous() and cu_k.is_contiguous()
    if table is not None:
        assert table.dtype == torch.int32 and table.is_contiguous()
    hkv = k.shape[-2]
    if family == "fa3":  # rows are covered by the actual lengths, not the max_seqlen_q bound
        max_q = max(max_q, int((cu_q[1:] - cu_q[:-1]).max()))
    else:
        _check_gqa_fold(q, hkv, cu_q, max_q, window_size)
    causal, left = _fa_mask(causal, window_size)
    out, lse = reference.prefill(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, table, left,
                                 softcap, return_lse=True)
    unowned = torch.arange(q.shape[0]) >= cu_q[-1]
    if family == "fa2":
        lse = torch.where(torch.isneginf(lse), INF, lse)  # FA2: +inf for a row without a key
    return _poison(out, unowned), _poison(lse.t().contiguous(), unowned, dim=1)


def _fa_decode(q, k_cache, v_cache, cache_seqlens, table, scale, causal, window_size, softcap,
               family):
    """(out [B, 1, H, D], lse [B, H, 1]) of one query per sequence over the paged cache."""
    assert q.dim() == 4 and q.shape[1] == 1 and table.dtype == torch.int32
    assert cache_seqlens.dtype == torch.int32
    _, left = _fa_mask(causal, window_size)
    out, lse = reference.decode(q[:, 0], k_cache, v_cache, cache_seqlens, table, scale, left,
                                softcap, return_lse=True)
    if family == "fa2":  # split-KV: an empty row is not promised (finite or not)
        empty = cache_seqlens == 0
        out, lse = _poison(out, empty), _poison(lse, empty)
    return out[:, None], lse[:, :, None]


# ---------------------------------------------------------------------------------------------
# FA2 (flash_attn package)
# ---------------------------------------------------------------------------------------------

def fa2_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    assert dropout_p == 0.0
    out, lse = _fa_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale, causal, window_size, softcap, block_table, "fa2")
    return (out, lse, None) if return_attn_probs else out


def fa2_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                     cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                     block_table=None, softmax_scale=None, causal=False, window_size=(-1, -1),
                     softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                     return_softmax_lse=False):
    assert k is None
    out, lse = _fa_decode(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal,
                          window_size, softcap, "fa2")
    return (out, lse) if return_softmax_lse else out


# ---------------------------------------------------------------------------------------------
# FA3 (flash_attn_interface / fa3_fwd_interface) and its compiled forward op
# ---------------------------------------------------------------------------------------------

def fa3_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
               seqused_q=None, seqused_k=None, softmax_scale=None, causal=False, qv=None,
               q_descale=None, k_descale=None, v_descale=None, window_size=(-1, -1),
               attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False,
               sm_margin=0, return_attn_probs=False):
    out, lse = _fa_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale, causal, window_size, softcap, None, "fa3")
    return (out, lse) if return_attn_probs else out


def fa3_with_kvcache(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None,
                     rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
                     cache_leftpad=None, page_table=None, cu_seqlens_q=None, cu_seqlens_k_new=None,
                     max_seqlen_q=None, rotary_seqlens=None, q_descale=None, k_descale=None,
                     v_descale=None, softmax_scale=None, causal=False, window_size=(-1, -1),
                     attention_chunk=0, softcap=0.0, rotary_interleaved=True,
                     scheduler_metadata=None, num_splits=0, pack_gqa=None, sm_margin=0,
                     return_softmax_lse=False):
    assert k is None and page_table.dtype == torch.int32
    if cu_seqlens_q is None:
        out, lse = _fa_decode(q, k_cache, v_cache, cache_seqlens, page_table, softmax_scale,
                              causal, window_size, softcap, "fa3")
    else:  # varlen queries over the paged cache: one page-table row per sequence
        assert page_table.shape[0] == cu_seqlens_q.shape[0] - 1 == cache_seqlens.shape[0]
        cu_k = torch.nn.functional.pad(cache_seqlens.cumsum(0, dtype=torch.int32), (1, 0))
        max_k = page_table.shape[1] * k_cache.shape[1]
        out, lse = _fa_prefill(q, k_cache, v_cache, cu_seqlens_q, cu_k, max_seqlen_q, max_k,
                               softmax_scale, causal, window_size, softcap, page_table, "fa3")
    return (out, lse, None, None) if return_softmax_lse else out


def fa3_raw_fwd(q, k, v, k_new=None, v_new=None, q_v=None, out=None, cu_seqlens_q=None,
                cu_seqlens_k=None, cu_seqlens_k_new=None, seqused_q=None, seqused_k=None,
                max_seqlen_q=None, max_seqlen_k=None, page_table=None, kv_batch_idx=None,
                leftpad_k=None, rotary_cos=None, rotary_sin=None, seqlens_rotary=None,
                q_descale=None, k_descale=None, v_descale=None, softmax_scale=None,
                is_causal=False, window_size_left=-1, window_size_right=-1, attention_chunk=0,
                softcap=0.0, is_rotary_interleaved=False, scheduler_metadata=None, num_splits=0,
                pack_gqa=None, sm_margin=0):
    """FA3's compiled ``fwd`` (fa3-fwd 0.0.3's schema): ``(out, softmax_lse, out_accum,
    softmax_lse_accum)``; dense varlen only here."""
    assert cu_seqlens_q is not None and page_table is None and out is None
    o, lse = _fa_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale, is_causal, (window_size_left, window_size_right), softcap,
                         None, "fa3")
    return o, lse, None, None


# ---------------------------------------------------------------------------------------------
# aten._flash_attention_forward (FA2 inside PyTorch)
# ---------------------------------------------------------------------------------------------

def aten_flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                       is_causal, return_debug_mask, *, scale=None, window_size_left=None,
                       window_size_right=None, seqused_k=None, alibi_slopes=None,
                       block_table=None, num_splits=None):
    window = (-1 if window_size_left is None else window_size_left,
              -1 if window_size_right is None else window_size_right)
    if block_table is not None:  # torch: "block_table ... Requires seqused_k"
        assert seqused_k is not None and seqused_k.dtype == torch.int32
        assert torch.equal(seqused_k, cum_seq_k[1:] - cum_seq_k[:-1])
    out, lse = _fa_prefill(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, scale,
                           is_causal, window, 0.0, block_table, "fa2")
    lens_k = cum_seq_k[1:] - cum_seq_k[:-1]
    if max_q == 1:  # a decode batch: a sequence with no key may come back non-finite
        empty = torch.zeros(query.shape[0], dtype=torch.bool)
        empty[:lens_k.shape[0]] = lens_k == 0
        out, lse = _poison(out, empty), _poison(lse, empty, dim=1)
    return out, lse, None, None, None


def module(name, **attributes):
    """An importable-looking module ``name`` holding ``attributes`` (version 9.9.9)."""
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__version__ = "9.9.9"
    for attr, value in attributes.items():
        setattr(mod, attr, value)
    return mod


FAKE_FA2 = module("flash_attn", flash_attn_varlen_func=fa2_varlen,
                  flash_attn_with_kvcache=fa2_with_kvcache)
# FA3 through its Python entry points only (a build whose compiled op is not reachable).
FAKE_FA3 = module("flash_attn_interface", flash_attn_varlen_func=fa3_varlen,
                  flash_attn_with_kvcache=fa3_with_kvcache)
# FA3 with its compiled forward op exposed as fa3-fwd / FA3 main do.
FAKE_FA3_RAW = module("flash_attn_interface", flash_attn_varlen_func=fa3_varlen,
                      flash_attn_with_kvcache=fa3_with_kvcache,
                      flash_attn_3_cuda=types.SimpleNamespace(fwd=fa3_raw_fwd))
FAKE_FA3_FWD = module("fa3_fwd_interface", flash_attn_varlen_func=fa3_varlen,
                      flash_attn_with_kvcache=fa3_with_kvcache,
                      fa3_fwd_cuda=types.SimpleNamespace(fwd=fa3_raw_fwd))


# aten::_flash_attention_forward argument names, torch 2.11 and torch 2.13.
ATEN_211 = ["query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p",
            "is_causal", "return_debug_mask", "scale", "window_size_left", "window_size_right",
            "seqused_k", "alibi_slopes"]
ATEN_213 = ATEN_211 + ["block_table", "num_splits"]


def stand_in_providers() -> dict:
    """The flash backend's providers built over the stand-ins above, by provider name."""
    from attn_ops.backends import flash
    return {"fa3": flash._fa3_provider(FAKE_FA3), "fa3_raw": flash._fa3_provider(FAKE_FA3_RAW),
            "fa3_fwd": flash._fa3_fwd_provider(FAKE_FA3_FWD),
            "fa2": flash._fa2_provider(FAKE_FA2),
            "aten": flash.aten_provider(ATEN_213, "2.13.0")}


def serve_with(monkeypatch, provider) -> None:
    """Make the flash backend serve every call with ``provider`` and aten's FA2 the stand-in."""
    from attn_ops.backends import flash
    from attn_ops.backends.flash import calls
    monkeypatch.setattr(flash, "_provider", lambda config: provider)
    monkeypatch.setattr(calls, "_aten_flash_forward", lambda: aten_flash_forward)
