"""Stand-ins for the FlashAttention kernels, for CPU tests of the flash backend's call code.

They keep FlashAttention's documented calling conventions (window ``(left, right)``, causal
forcing right = 0, int32 block tables, torch's "block_table requires seqused_k", FA2's fold of
GQA heads into rows when max_seqlen_q == 1) and compute with the reference backend. What the
real kernels leave unwritten or do not promise (rows past cu_seqlens_q[-1], rows with no key) is
NaN here, so a missing fix-up in the backend shows as NaN.
"""

import importlib.machinery
import types

import torch

from attn_ops.backends import reference

NAN = float("nan")



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


def _poison(out, rows):
    out = out.clone()
    out[rows] = NAN  # what the kernel does not write (or does not promise)
    return out


def _fa_prefill(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window_size, softcap, table):
    if table is not None:
        assert table.dtype == torch.int32 and table.is_contiguous()
    hkv = k.shape[-2]
    _check_gqa_fold(q, hkv, cu_q, max_q, window_size)
    causal, left = _fa_mask(causal, window_size)
    out = reference.prefill(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, table, left,
                            softcap)
    return _poison(out, torch.arange(q.shape[0]) >= cu_q[-1])


def fa2_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    assert dropout_p == 0.0
    return _fa_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       softmax_scale, causal, window_size, softcap, block_table)


def fa2_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                     cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                     block_table=None, softmax_scale=None, causal=False, window_size=(-1, -1),
                     softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                     return_softmax_lse=False):
    assert k is None and q.dim() == 4 and q.shape[1] == 1 and block_table.dtype == torch.int32
    _, left = _fa_mask(causal, window_size)
    out = reference.decode(q[:, 0], k_cache, v_cache, cache_seqlens, block_table, softmax_scale,
                           left, softcap)
    return _poison(out, cache_seqlens == 0)[:, None]


def fa3_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
               seqused_q=None, seqused_k=None, softmax_scale=None, causal=False, qv=None,
               q_descale=None, k_descale=None, v_descale=None, window_size=(-1, -1),
               attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False,
               sm_margin=0, return_attn_probs=False):
    out = _fa_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      softmax_scale, causal, window_size, softcap, None)
    return out, torch.zeros(q.shape[1], q.shape[0])  # some FA3 builds return (out, lse)


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
        return fa2_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens,
                                block_table=page_table, softmax_scale=softmax_scale,
                                causal=causal, window_size=window_size, softcap=softcap)
    cu_k = torch.nn.functional.pad(cache_seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    max_k = page_table.shape[1] * k_cache.shape[1]
    return _fa_prefill(q, k_cache, v_cache, cu_seqlens_q, cu_k, max_seqlen_q, max_k,
                       softmax_scale, causal, window_size, softcap, page_table)


def aten_flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                       is_causal, return_debug_mask, *, scale=None, window_size_left=None,
                       window_size_right=None, seqused_k=None, alibi_slopes=None,
                       block_table=None, num_splits=None):
    window = (-1 if window_size_left is None else window_size_left,
              -1 if window_size_right is None else window_size_right)
    if block_table is not None:  # torch: "block_table ... Requires seqused_k"
        assert seqused_k is not None and seqused_k.dtype == torch.int32
        assert torch.equal(seqused_k, cum_seq_k[1:] - cum_seq_k[:-1])
    out = _fa_prefill(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, scale, is_causal,
                      window, 0.0, block_table)
    lens_k = cum_seq_k[1:] - cum_seq_k[:-1]
    if max_q == 1:  # a decode batch: a sequence with no key may come back non-finite
        out = _poison(out, lens_k == 0)
    return out, None, None, None, None


def module(name, **functions):
    """An importable-looking module ``name`` holding ``functions`` (version 9.9.9)."""
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__version__ = "9.9.9"
    for fname, fn in functions.items():
        setattr(mod, fname, fn)
    return mod


FAKE_FA2 = module("flash_attn", flash_attn_varlen_func=fa2_varlen,
                  flash_attn_with_kvcache=fa2_with_kvcache)
FAKE_FA3 = module("flash_attn_interface", flash_attn_varlen_func=fa3_varlen,
                  flash_attn_with_kvcache=fa3_with_kvcache)
