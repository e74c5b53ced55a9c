"""The split decode kernel's machine code for sm_90a. Compiled only (tests/support/sass.py), on
the GPU machine's Triton (Triton 3.9, which CI installs, builds these loops differently), so
this runs with the GPU tests.
- Writing the lse must not change the key loop: under Triton 3.6 an inlined merge that stores
  the lse after the loop cost the FP8 deep row 168 registers and a spill in the loop (+4.4% at
  B 24), and the WIDE row 37 instructions per 128-key step; the merge is a call there now
  (merge_kernel.merge_last_split_call).
- An FP8 key tile is widened without byte permutes (fp8_widening.fp8_key_halves)."""

import re

import pytest

from attn_ops.backends.triton import decode_plan
from tests.support import sass

pytestmark = pytest.mark.cuda

_POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "SEQLENS": "*i32", "TABLE": "*i32",
             "OUT": "*bf16", "O_PART": "*fp32", "LSE_PART": "*fp32", "SEMA": "*i32",
             "LSE": "*fp32", "SINK_LOGITS": "*fp32", "K_SCALE": "*fp32", "V_SCALE": "*fp32"}
# Strides Triton sees as multiples of 16 at a launch over packed caches (D 128, 8 kv heads)
_ALIGNED = {"stride_qb", "stride_qh", "stride_kb", "stride_kt", "stride_kh", "stride_vb",
            "stride_vt", "stride_vh", "stride_tb", "stride_ob", "stride_oh"}


def _build(config, fp8, with_lse, sinks=False):
    pointers = dict(_POINTERS, **({"K": "*fp8e4nv", "V": "*fp8e4nv"} if fp8 else {}))
    constexprs = dict(GROUP=4, G_P2=16, HEAD_DIM=128, D_P2=128, PAGE=16,
                      BLOCK_N=config.block_n, DIRECT=False, SOFTCAP=False, WINDOW=False,
                      FUSED=True, DOT="tf32", HAS_SINKS=sinks, FP8=fp8, WITH_LSE=with_lse,
                      FP8_VIA_F16=fp8, FP8_PAIRS=fp8, PAIR_ASM=fp8, R_P2=4, S_P2=2, CHUNKS=1,
                      KV_SAME_STRIDES=True)
    options = dict(num_warps=config.warps, num_stages=config.stages)
    if config.maxnreg:
        options["maxnreg"] = config.maxnreg
    return sass.build("attn_ops.backends.triton.decode_kernel:_decode_split_kernel", pointers,
                      constexprs, _ALIGNED, **options)


@pytest.mark.skipif(not sass.available(), reason="Triton's ptxas / cuobjdump are not installed")
@pytest.mark.parametrize("row, fp8", [(decode_plan.FP8_DEEP_CONFIG, True),
                                      (decode_plan.WIDE_CONFIG, False)],
                         ids=["fp8_deep", "wide"])
def test_lse_keeps_the_key_loop(row, fp8):
    # The fused merge of two splits, as the plan launches it at B 16 (FP8) and B 8 (bf16)
    decode = _build(row, fp8, with_lse=False)
    loop = decode.key_loop()
    for sinks in (False, True):
        lse = _build(row, fp8, with_lse=True, sinks=sinks)
        lse_loop = lse.key_loop()
        assert not [t for t in lse_loop if "LDL" in t or "STL" in t], "a spill in the key loop"
        assert lse.stack <= decode.stack, (lse.stack, decode.stack)
        assert len(lse_loop) <= len(loop) + 2, (len(lse_loop), len(loop))
        assert sum("HMMA" in t for t in lse_loop) == sum("HMMA" in t for t in loop)


@pytest.mark.skipif(not sass.available(), reason="Triton's ptxas / cuobjdump are not installed")
def test_fp8_keys_widen_without_byte_permutes():
    # An FP8 cache read as int16: V's tile pairs two keys' bytes per fp16x2 (P V's operand runs
    # along the keys), one byte permute per two elements: 32 per thread per 128-key step at 4
    # warps. K's tile is widened in halves of four bytes (fp8_widening.fp8_key_halves), whose pairs
    # run along the head dim as the conversion gives them: none. (Even and odd columns for K
    # as for V took 64.)
    loop = _build(decode_plan.FP8_DEEP_CONFIG, True, with_lse=False).key_loop()
    assert sum(bool(re.search(r"\bPRMT\b", t)) for t in loop) == 32
