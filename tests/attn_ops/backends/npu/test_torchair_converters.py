"""The GE converters of torchair's max-autotune mode, run against an evaluating torchair stand-in.

torchair is not installable here (it needs torch_npu and CANN). tests/support/torchair_stand_in.py
evaluates each GE builder on torch tensors and the torch_npu emulator serves FIA v2 and the
cache scatter, so each converter computes a value that must equal the reference backend's:
the lengths it derives from cu_seqlens / seqlens, the paged cache views, the causal mask and
the padding-row redirect are all checked by value. Without torchair at all, importing the
converters must fail on exactly ``torchair``.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import attn_ops  # noqa: F401  (registers torch.ops.attn)
from attn_ops.backends import reference
from tests.support import npu_emulator as emu
from tests.support import torchair_stand_in as stand_in
from tests.support.helpers import (TOLERANCES, assert_close, cu_seqlens, importable_stand_ins,
                                   random_paged)

EMULATED = emu.install()
pytestmark = pytest.mark.skipif(not EMULATED, reason="a real torch_npu is loaded; these tests "
                                                     "drive the CPU emulator of its ops")
BF16 = torch.bfloat16
MODULE = "attn_ops.backends.npu.torchair_converters"


def _fia_with_tensor_lengths(q, k, v, *, actual_seq_qlen=None, actual_seq_kvlen=None, **kw):
    """torchair's FIA v2 converter takes lengths as tensors; the emulator takes host lists."""
    if actual_seq_qlen is not None:
        kw["actual_seq_qlen"] = actual_seq_qlen.tolist()
    return torch.ops.npu.npu_fused_infer_attention_score_v2(
        q, k, v, actual_seq_kvlen=actual_seq_kvlen.tolist(), **kw)


@pytest.fixture
def converters(monkeypatch):
    with stand_in.installed():
        module = importlib.import_module(MODULE)
        monkeypatch.setattr(module, "_fia", _fia_with_tensor_lengths)
        yield module


def test_importing_registers_one_converter_per_op(converters):
    ops = torch.ops.attn
    assert stand_in.REGISTERED == {ops.prefill.default: converters.convert_attn_prefill,
                                   ops.decode.default: converters.convert_attn_decode,
                                   ops.store_kvcache.default:
                                       converters.convert_attn_store_kvcache}


def test_without_torchair_the_import_fails_on_torchair(monkeypatch, tmp_path):
    sys.modules.pop(MODULE, None)
    with importable_stand_ins(monkeypatch, tmp_path, "torch_npu"):  # a guarded import shows
        with pytest.raises(ImportError) as e:
            importlib.import_module(MODULE)
        assert e.value.name == "torchair"
        assert "torch_npu" not in sys.modules


@pytest.mark.parametrize("paged", [False, True])
def test_prefill_matches_the_reference(converters, paged):
    lens_q, lens_k = [3, 13], [130, 13] if paged else [3, 13]
    h, hkv, d = 4, 2, 128  # FIA's TND layout: bf16 with head dim 128 or 192
    q = torch.randn(sum(lens_q), h, d, dtype=BF16)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    if paged:
        pb = random_paged(lens_k, hkv, d, 128, BF16)
        k, v, table = pb.k_cache, pb.v_cache, pb.block_table
    else:
        k, v = (torch.randn(sum(lens_k), hkv, d, dtype=BF16) for _ in range(2))
        table = None
    args = (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), 0.1, True)
    # An int64 table, as a graph may carry one: the converter casts it to FIA's int32
    out = converters.convert_attn_prefill(*map(stand_in.with_symsize, args[:5]), *args[5:],
                                          block_table=None if table is None else table.long())
    expected = reference.prefill(*args, block_table=table)
    assert_close(out, expected, *TOLERANCES[BF16])


def test_decode_matches_the_reference_and_zeroes_empty_rows(converters):
    lens = [5, 0, 17]
    pb = random_paged(lens, 2, 64, 16, BF16)
    q = torch.randn(len(lens), 4, 64, dtype=BF16)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    out = converters.convert_attn_decode(*map(stand_in.with_symsize, (q, pb.k_cache, pb.v_cache)),
                                         seqlens, pb.block_table.long(), 0.125)  # cast inside
    expected = reference.decode(q, pb.k_cache, pb.v_cache, seqlens, pb.block_table, 0.125)
    assert_close(out, expected, *TOLERANCES[BF16])
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("slots", [[7, -1, 3, 20], [-1, -1]], ids=["padding_row", "all_padding"])
def test_store_writes_what_the_reference_writes(converters, slots):
    kc, vc = (torch.randn(3, 16, 2, 64, dtype=BF16) for _ in range(2))
    key, value = (torch.randn(len(slots), 2, 64, dtype=BF16) for _ in range(2))
    slot_mapping = torch.tensor(slots)
    ref_k, ref_v = kc.clone(), vc.clone()
    reference.store_kvcache(key, value, ref_k, ref_v, slot_mapping)
    converters.convert_attn_store_kvcache(key, value, *map(stand_in.with_symsize, (kc, vc)),
                                          slot_mapping)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
