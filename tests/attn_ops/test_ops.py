"""The op contract itself: schemas as published, opcheck over many shapes, lean import."""

import subprocess
import sys

import pytest
import torch
from torch.library import opcheck

import attn_ops  # noqa: F401  (registers torch.ops.attn.*)
from tests.support.helpers import cu_seqlens, random_paged

_PREFILL_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
                 "SymInt max_seqlen_q, SymInt max_seqlen_k, float scale, bool causal=True, "
                 "Tensor? block_table=None, SymInt window_left=-1, float softcap=0., "
                 "Tensor? sinks=None, Tensor? k_scale=None, Tensor? v_scale=None")
_DECODE_ARGS = ("Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens_k, Tensor block_table, "
                "float scale, SymInt window_left=-1, float softcap=0., Tensor? sinks=None, "
                "Tensor? k_scale=None, Tensor? v_scale=None")
SCHEMAS = {
    "store_kvcache": "attn::store_kvcache(Tensor key, Tensor value, Tensor(a!) k_cache, "
                     "Tensor(b!) v_cache, Tensor slot_mapping, Tensor? k_scale=None, "
                     "Tensor? v_scale=None) -> ()",
    "prefill": f"attn::prefill({_PREFILL_ARGS}) -> Tensor",
    "decode": f"attn::decode({_DECODE_ARGS}) -> Tensor",
    "prefill_with_lse": f"attn::prefill_with_lse({_PREFILL_ARGS}) -> (Tensor out, Tensor lse)",
    "decode_with_lse": f"attn::decode_with_lse({_DECODE_ARGS}) -> (Tensor out, Tensor lse)",
    "merge_states": "attn::merge_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) "
                    "-> (Tensor out, Tensor lse)",
}


@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_schema_is_the_published_contract(op):
    assert str(getattr(torch.ops.attn, op).default._schema) == SCHEMAS[op]


def test_store_declares_cache_mutation_only():
    schema = torch.ops.attn.store_kvcache.default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write]
    assert mutated == ["k_cache", "v_cache"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,hkv,d,bs,slot_dtype", [
    (1, 1, 32, 16, torch.int32), (13, 2, 64, 4, torch.int64), (40, 4, 128, 16, torch.int32),
    (0, 2, 64, 16, torch.int64)])
def test_opcheck_store_kvcache(dtype, t, hkv, d, bs, slot_dtype):
    num_blocks = 8
    k_cache = torch.randn(num_blocks, bs, hkv, d, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(num_blocks * bs)[:t].to(slot_dtype)
    if t > 2:
        slots[1] = -1
    opcheck(torch.ops.attn.store_kvcache.default,
            (torch.randn(t, hkv, d, dtype=dtype), torch.randn(t, hkv, d, dtype=dtype), k_cache,
             v_cache, slots))


PREFILL_CASES = [
    # lens_q, lens_k, H, Hkv, D, causal, window, softcap
    ([5], [5], 2, 2, 32, True, -1, 0.0),
    ([3, 13, 1], [3, 13, 1], 4, 2, 64, True, -1, 0.0),
    ([7, 0, 4], [9, 0, 10], 8, 1, 128, True, 3, 0.0),
    ([4, 6], [4, 6], 4, 4, 256, False, -1, 30.0),
    ([2, 5], [6, 5], 6, 3, 96, False, 2, 0.0),
]


@pytest.mark.parametrize("lens_q,lens_k,h,hkv,d,causal,window,softcap", PREFILL_CASES)
@pytest.mark.parametrize("paged", [False, True])
def test_opcheck_prefill(lens_q, lens_k, h, hkv, d, causal, window, softcap, paged):
    q = torch.randn(sum(lens_q), h, d, dtype=torch.bfloat16)
    if paged:
        pb = random_paged(lens_k, hkv, d, 4, torch.bfloat16)
        k, v, table = pb.k_cache, pb.v_cache, pb.block_table
    else:
        k = torch.randn(sum(lens_k), hkv, d, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        table = None
    opcheck(torch.ops.attn.prefill.default,
            (q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k),
             d ** -0.5, causal, table, window, softcap))


@pytest.mark.parametrize("lens,h,hkv,d,bs,window,softcap", [
    ([5], 2, 2, 32, 16, -1, 0.0), ([1, 17, 0, 33], 4, 2, 64, 8, -1, 0.0),
    ([9, 3], 8, 1, 128, 4, 4, 20.0)])
def test_opcheck_decode(lens, h, hkv, d, bs, window, softcap):
    pb = random_paged(lens, hkv, d, bs, torch.float16)
    opcheck(torch.ops.attn.decode.default,
            (torch.randn(len(lens), h, d, dtype=torch.float16), pb.k_cache, pb.v_cache,
             torch.tensor(lens, dtype=torch.int32), pb.block_table, d ** -0.5, window, softcap))


def test_backward_is_a_clear_error():
    q = torch.randn(4, 2, 32, requires_grad=True)
    k = torch.randn(4, 2, 32)
    cu = cu_seqlens([4])
    out = torch.ops.attn.prefill(q, k, k, cu, cu, 4, 4, 0.1)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


def test_import_is_lean():
    """Importing attn_ops registers the ops but imports no optional backend nor starts CUDA."""
    code = (
        "import sys, torch, attn_ops\n"
        "assert hasattr(torch.ops.attn, 'prefill')\n"
        "bad = [m for m in ('triton', 'flash_attn', 'flash_attn_interface', 'torch_npu',"
        " 'torchair', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
