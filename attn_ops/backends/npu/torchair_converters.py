"""GE converters for ``torch.ops.attn.*``, used by torchair's max-autotune (GE graph) mode.

UNTESTED: torchair needs torch_npu and CANN, which no machine of this project has; this module
was written against torch_npu 2.13's torchair sources (its own FIA v2 and ScatterPaKvCache
converters) and has never been imported, let alone run. Treat it as a starting point to verify on
an Ascend machine (docs/npu.md lists what to check). Importing it requires torchair, and imports
it; importing it registers the converters.

In a GE graph the lengths can stay on the device: FIA's ``actual_seq_*`` inputs are int64 tensors
there. So each converter builds the same call as ``attn_ops.backends.npu.lowering`` (same
:class:`~attn_ops.backends.npu.lowering.FiaSpec`), with the lengths computed by GE ops from the
cu_seqlens / seqlens tensors, and delegates the FIA node itself to torchair's converter for
``torch.ops.air.npu_fused_infer_attention_score_v2`` (the tensor-lengths variant). As in the
reduce-overhead decomposition, prefill expects ``cu_seqlens_q[-1]`` to equal the token count
(FIA enforces it); padded tails are not sliced off here.
"""

from __future__ import annotations

import torch
import torchair
from torchair import ge as public_ge
from torchair._ge_concrete_graph import ge_apis as ge  # the GE op builders torchair's own
# converters use; importing the module below registers torch.ops.air's FIA v2 and its converter.
from torchair.ops import _npu_fused_infer_attention_score_v2  # noqa: F401

from attn_ops.backends.npu import lowering

DT = public_ge.DataType


def _fia(*args, **kwargs):
    converter = torch.ops.air.npu_fused_infer_attention_score_v2.default._ge_converter
    return converter(*args, **kwargs)


def _const(values, dtype=DT.DT_INT64):
    return public_ge.Const(values, dtype=dtype)


def _static(tensor, dim: int, what: str) -> int:
    size = tensor.symsize[dim]
    if not isinstance(size, int):
        raise RuntimeError(f"attn GE converter: {what} must be static, got {size}")
    return size


def _tail(vector, length: int):
    """``vector[1:]`` of a 1-D tensor of ``length + 1`` entries, as int64."""
    return public_ge.Cast(ge.Slice(vector, _const([1]), _const([length])), dst_type=DT.DT_INT64)


def _head(vector, length: int):
    """``vector[:-1]`` of a 1-D tensor of ``length + 1`` entries, as int64."""
    return public_ge.Cast(ge.Slice(vector, _const([0]), _const([length])), dst_type=DT.DT_INT64)


def _paged_view(cache, block_size: int, width: int):
    """``[nb, bs, Hkv, D] -> [nb, bs, Hkv*D]``: FIA reads a 4-D cache as ``[nb, Hkv, bs, D]``."""
    return ge.Reshape(cache, _const([-1, block_size, width]))


@torchair.register_fx_node_ge_converter(torch.ops.attn.prefill.default)
def convert_attn_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                         causal=True, block_table=None, window_left=-1, softcap=0.0,
                         meta_outputs=None):
    """attn::prefill -> FIA v2, TND, tensor lengths (see lowering.prefill_fia)."""
    paged = block_table is not None
    h, d = _static(q, 1, "H"), _static(q, 2, "D")
    hkv = _static(k, 2 if paged else 1, "Hkv")
    bs = _static(k, 1, "block_size") if paged else 0
    spec = lowering.prefill_spec(h, hkv, d, bs, scale, causal, window_left, softcap)
    b = _static(cu_seqlens_q, 0, "B + 1") - 1
    q_ends = _tail(cu_seqlens_q, b)
    kv = _tail(cu_seqlens_k, b)
    if paged:
        kv = ge.Sub(kv, _head(cu_seqlens_k, b))  # per-request lengths with a block table
        k, v = _paged_view(k, bs, hkv * d), _paged_view(v, bs, hkv * d)
        block_table = public_ge.Cast(block_table, dst_type=DT.DT_INT32)
    mask = None
    if spec.sparse_mode:
        ones = torch.ones(lowering.COMPRESSED_MASK_SIZE, lowering.COMPRESSED_MASK_SIZE,
                          dtype=torch.bool)
        mask = public_ge.Const(ones.triu(1), dtype=DT.DT_BOOL, readable=False)
    out, _ = _fia(q, k, v, atten_mask=mask, actual_seq_qlen=q_ends, actual_seq_kvlen=kv,
                  block_table=block_table if paged else None, num_query_heads=spec.num_heads,
                  num_key_value_heads=spec.num_kv_heads, softmax_scale=spec.scale,
                  pre_tokens=spec.pre_tokens, next_tokens=spec.next_tokens, input_layout="TND",
                  sparse_mode=spec.sparse_mode, block_size=spec.block_size)
    return out


@torchair.register_fx_node_ge_converter(torch.ops.attn.decode.default)
def convert_attn_decode(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left=-1,
                        softcap=0.0, meta_outputs=None):
    """attn::decode -> FIA v2, BNSD, tensor lengths; rows with seqlens_k == 0 set to zero."""
    h, d = _static(q, 1, "H"), _static(q, 2, "D")
    bs, hkv = _static(k_cache, 1, "block_size"), _static(k_cache, 2, "Hkv")
    spec = lowering.decode_spec(h, hkv, d, bs, scale, window_left, softcap)
    out, _ = _fia(ge.Unsqueeze(q, axes=[2]), _paged_view(k_cache, bs, hkv * d),
                  _paged_view(v_cache, bs, hkv * d),
                  actual_seq_kvlen=public_ge.Cast(seqlens_k, dst_type=DT.DT_INT64),
                  block_table=public_ge.Cast(block_table, dst_type=DT.DT_INT32),
                  num_query_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                  softmax_scale=spec.scale, input_layout="BNSD", block_size=spec.block_size)
    out = ge.Squeeze(out, axis=[2])
    has_keys = ge.Unsqueeze(ge.Greater(seqlens_k, _const(0, DT.DT_INT32)), axes=[1, 2])
    return ge.SelectV2(has_keys, out, ge.ZerosLike(out))


@torchair.register_fx_node_ge_converter(torch.ops.attn.store_kvcache.default)
def convert_attn_store_kvcache(key, value, k_cache, v_cache, slot_mapping, meta_outputs=None):
    """attn::store_kvcache -> ScatterPaKvCache (cache_mode Norm) on the [nb, bs, Hkv, D] caches.

    torchair hands a mutating op to this converter through auto_functionalized_v2, with the
    caches as in-place (ref) inputs. Padding rows (slot -1) are redirected exactly as
    lowering.redirect_padding_rows does, so every slot written is in range.
    """
    slots = public_ge.Cast(slot_mapping, dst_type=DT.DT_INT64)
    valid = ge.GreaterEqual(slots, _const(0))
    first = ge.ArgMaxV2(public_ge.Cast(valid, dst_type=DT.DT_INT32), _const(0, DT.DT_INT32),
                        dtype=DT.DT_INT64)
    first = ge.Reshape(first, _const([1]))
    any_valid = ge.ReduceAny(valid, _const([0]), keep_dims=False)
    fill_slot = ge.SelectV2(any_valid, ge.GatherV2(slots, first, _const(0)), _const([0]))
    rows = []
    for src, cache in ((key, k_cache), (value, v_cache)):
        flat = ge.Reshape(cache, _const([-1, _static(cache, 2, "Hkv"), _static(cache, 3, "D")]))
        filler = ge.SelectV2(any_valid, ge.GatherV2(src, first, _const(0)),
                             ge.GatherV2(flat, fill_slot, _const(0)))
        rows.append(ge.SelectV2(ge.Unsqueeze(valid, axes=[1, 2]), src, filler))
    slots = ge.SelectV2(valid, slots, fill_slot)
    return ge.ScatterPaKvCache(rows[0], k_cache, slots, rows[1], v_cache, None, None, None,
                               cache_mode="Norm", scatter_mode="None", strides=[1, 1],
                               offsets=[0, 0])
