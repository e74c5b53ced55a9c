"""The flash call adapters: LSE on every provider, the fix-ups each provider needs and no more,
and what is decided once per signature (CPU, with the stand-in kernels of flash_fakes).

GPU (``-m cuda``): the LSE of every installed provider against the reference backend.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attn_ops
from attn_ops import registry
from attn_ops.backends import flash, reference
from attn_ops.backends.flash import calls
from attn_ops.contract import OpConfig, prefill_config
from tests.support.flash_fakes import (serve_with, stand_in_providers,
                                       FAKE_FA2, FAKE_FA3, FAKE_FA3_FWD, FAKE_FA3_RAW, NAN,
                                       aten_flash_forward, fa3_raw_fwd, module)
from tests.support.helpers import TOLERANCES, assert_close, cu_seqlens, random_paged

CUDA = torch.device("cuda")
PROVIDERS = stand_in_providers()


@pytest.fixture(params=sorted(PROVIDERS))
def provider(request, monkeypatch):
    p = PROVIDERS[request.param]
    serve_with(monkeypatch, p)
    return p


def _serves(p, op, **cfg) -> bool:
    config = OpConfig(op, CUDA, torch.bfloat16, 32, 2, num_heads=4, with_lse=True,
                      block_size=256 if op == "decode" or cfg.get("paged") else None, **cfg)
    return flash.provider_reason(p, config, (9, 0)) is None


def _same_lse(got, want):
    """Equal, with -inf exactly where the reference has it (a row that sees no key)."""
    assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == want.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    finite = torch.isfinite(want)
    assert torch.isfinite(got[finite]).all()
    assert_close(got[finite], want[finite], 1e-5, 1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_with_lse_dense(provider, causal):
    if not _serves(provider, "prefill"):
        return
    # an empty sequence, a sequence with queries but no key, more queries than keys (causal rows
    # that see nothing), and two padded tail rows
    lens_q, lens_k = [3, 0, 2, 6, 1], [8, 0, 0, 4, 4]
    q = torch.randn(sum(lens_q) + 2, 4, 32)
    k, v = torch.randn(sum(lens_k), 2, 32), torch.randn(sum(lens_k), 2, 32)
    args = (q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), 6, 8, 0.3, causal)
    out, lse = flash.prefill(*args, return_lse=True)
    ref_out, ref_lse = reference.prefill(*args, return_lse=True)
    assert_close(out, ref_out, 1e-6, 1e-6)
    _same_lse(lse, ref_lse)
    assert torch.isneginf(lse[-2:]).all() and out[-2:].abs().sum() == 0


def test_prefill_with_lse_paged(provider):
    if not _serves(provider, "prefill", paged=True):
        return
    lens_q, lens_k = [4, 0, 9, 2], [300, 0, 9, 0]
    batch = random_paged(lens_k, 2, 32, 256, torch.float32, table_width=3)
    q = torch.randn(sum(lens_q) + 3, 4, 32)
    args = (q, batch.k_cache, batch.v_cache, cu_seqlens(lens_q), cu_seqlens(lens_k), 9, 300,
            0.2, True, batch.block_table)
    out, lse = flash.prefill(*args, return_lse=True)
    ref_out, ref_lse = reference.prefill(*args, return_lse=True)
    assert_close(out, ref_out, 1e-6, 1e-6)
    _same_lse(lse, ref_lse)


@pytest.mark.parametrize("window", [-1, 3])
def test_decode_with_lse(provider, window):
    if not _serves(provider, "decode", window_left=window):
        return
    lens = [0, 5, 300, 1]
    batch = random_paged(lens, 2, 32, 256, torch.float32, table_width=2)
    q = torch.randn(len(lens), 4, 32)
    args = (q, batch.k_cache, batch.v_cache, torch.tensor(lens, dtype=torch.int32),
            batch.block_table, 0.25, window)
    out, lse = flash.decode(*args, return_lse=True)
    ref_out, ref_lse = reference.decode(*args, return_lse=True)
    assert_close(out, ref_out, 1e-6, 1e-6)
    _same_lse(lse, ref_lse)
    assert out[0].abs().sum() == 0 and torch.isneginf(lse[0]).all()


def test_lse_refusals_say_which_entry_point_lacks_it():
    old_fa2 = flash._fa2_provider(module("flash_attn", flash_attn_varlen_func=lambda q, k, v,
                                         cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         dropout_p=0.0, softmax_scale=None, causal=False: None))
    config = prefill_config(torch.empty(3, 4, 32, dtype=torch.bfloat16),
                            torch.empty(3, 2, 32, dtype=torch.bfloat16), with_lse=True)
    reason = flash.provider_reason(old_fa2, config.replace(device=CUDA), (9, 0))
    assert "returns no softmax LSE" in reason and "9.9.9" in reason
    assert flash.provider_reason(PROVIDERS["fa3_raw"], config.replace(device=CUDA), (9, 0)) \
        is None


def test_fp8_and_sinks_reasons_name_the_mapping():
    fp8 = OpConfig("decode", CUDA, torch.bfloat16, 128, 8, num_heads=32, block_size=16,
                   paged=True, cache_dtype=torch.float8_e4m3fn)
    reason = flash.choose(fp8, (9, 0), (("fa3", PROVIDERS["fa3"]),))[1]
    for word in ("k_descale", "[B, Hkv]", "stride 0", "k.dtype == q.dtype", "no paged KV"):
        assert word in reason
    sinks = fp8.replace(cache_dtype=torch.bfloat16, has_sinks=True)
    assert "sink logits" in flash.choose(sinks, (9, 0), (("fa3", PROVIDERS["fa3"]),))[1]


# ---------------------------------------------------------------------------------------------
# What a call costs: the kernel call and the fix-ups, decided once per signature
# ---------------------------------------------------------------------------------------------

class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _stub_fwd(out, lse):
    """FA3's compiled fwd returning precomputed results (so only the adapter's ops are seen)."""
    def fwd(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
            max_seqlen_k=None, softmax_scale=None, is_causal=False, window_size_left=-1,
            window_size_right=-1, softcap=0.0, num_splits=0):
        return out, lse, None, None
    return fwd


@pytest.mark.parametrize("with_lse", [False, True])
def test_fa3_prefill_makes_no_pass_over_the_output(with_lse):
    lens = [5, 7, 3]
    q, k = torch.randn(17, 4, 32), torch.randn(15, 2, 32)
    cq, ck = cu_seqlens(lens), cu_seqlens(lens)
    out, lse, *_ = fa3_raw_fwd(q, k, k, cu_seqlens_q=torch.cat((cq, torch.tensor([17]).int())),
                               cu_seqlens_k=torch.cat((ck, ck[-1:])), max_seqlen_q=7,
                               max_seqlen_k=7, softmax_scale=0.3, is_causal=True)
    stub = module("fa3_fwd_interface", fa3_fwd_cuda=type("ns", (), {
        "fwd": staticmethod(_stub_fwd(out, lse))}), flash_attn_varlen_func=None)
    p = flash._fa3_fwd_provider(stub)
    assert p.raw_fwd is not None
    config = prefill_config(q, k, True, with_lse=with_lse).replace(device=CUDA)
    run = calls.bind(p, config)
    run(q, k, k, cq, ck, 7, 7, 0.3, True)  # constants made on the first call
    with _Ops() as ops:
        got = run(q, k, k, cq, ck, 7, 7, 0.3, True, None, -1, 0.0, return_lse=with_lse)
    # one cat of the metadata (B + 2 int32 values each), views of it; the LSE's transpose copy
    allowed = {"cat", "slice", "t", "clone"} if with_lse else {"cat", "slice"}
    assert set(ops.names) <= allowed and ops.names.count("cat") == 1, ops.names
    assert (got[0] if with_lse else got) is out  # the kernel's own output, not a copy


def test_bind_decides_once_per_signature(monkeypatch):
    p = PROVIDERS["fa3_raw"]
    config = prefill_config(torch.empty(3, 4, 32), torch.empty(3, 2, 32)).replace(device=CUDA)
    run = calls.bind(p, config)
    for fn in ("window_of", "_options"):
        monkeypatch.setattr(calls, fn, lambda *a, **k: pytest.fail("per-call decision"))
    monkeypatch.setattr(flash, "choose", lambda *a, **k: pytest.fail("per-call choice"))
    q, k = torch.randn(9, 4, 32), torch.randn(9, 2, 32)
    cu = cu_seqlens([4, 5])
    assert_close(run(q, k, k, cu, cu, 5, 5, 0.3), reference.prefill(q, k, k, cu, cu, 5, 5, 0.3),
                 1e-6, 1e-6)


def test_fa3_fwd_features_follow_its_build_flags(monkeypatch):
    flags = dict(flash.providers.FA3_FWD_FLAGS, FLASHATTENTION_DISABLE_FP16=False,
                 FLASHATTENTION_DISABLE_SOFTCAP=True)
    p = flash._fa3_fwd_provider(FAKE_FA3_FWD, flags)
    assert torch.float16 in p.dtypes and not p.softcap and "DISABLE_SOFTCAP" in p.notes["softcap"]
    monkeypatch.setitem(__import__("sys").modules, "fa3_fwd_config",
                        module("fa3_fwd_config", CONFIG={"build_flags": flags}))
    monkeypatch.setitem(__import__("sys").modules, "fa3_fwd_interface", FAKE_FA3_FWD)
    found = flash._detect_one("fa3_fwd")
    assert torch.float16 in found.dtypes and found.raw_fwd is not None
    assert flash.raw_fwd(FAKE_FA3) is None  # no compiled op reachable: Python entry points


# ---------------------------------------------------------------------------------------------
# GPU: the LSE of every installed provider against the reference backend
# ---------------------------------------------------------------------------------------------

@pytest.fixture(params=flash.PROVIDER_ORDER)
def gpu_provider(request, monkeypatch):
    found = dict(flash.detect())[request.param]
    if isinstance(found, str):
        pytest.skip(found)
    monkeypatch.setenv("ATTN_OPS_FLASH_IMPL", request.param)
    registry.clear_cache()
    yield found
    registry.clear_cache()


def _gpu_lse_check(p, op, call, **cfg):
    config = OpConfig(op, CUDA, torch.bfloat16, 128, 2, num_heads=8, with_lse=True,
                      block_size=256 if op == "decode" else None, **cfg)
    reason = flash.provider_reason(p, config, torch.cuda.get_device_capability())
    if reason is not None:
        pytest.skip(reason)
    for numel in (1 << 27, *(1 << 18,) * 16):  # poison the caching allocator
        torch.full((numel,), NAN, device=CUDA, dtype=torch.float16)
    out, lse = call("flash")
    ref_out, ref_lse = call("reference")
    atol, rtol = TOLERANCES[torch.bfloat16]
    assert_close(out, ref_out, 2 * atol, 2 * rtol)
    assert lse.is_contiguous() and torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert_close(lse[torch.isfinite(ref_lse)], ref_lse[torch.isfinite(ref_lse)], 1e-2, 1e-3)
    return out, lse


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_prefill_with_lse(gpu_provider, causal):
    # causal: every query is among the last lq of its lk keys (the contract's rule), so only the
    # padded tail sees no key; not causal: a sequence with queries and no keys too
    lens_q = [13, 0, 5, 123, 2]
    lens_k = [13, 0, 5, 300, 2] if causal else [13, 0, 0, 300, 1]
    q = torch.randn(sum(lens_q) + 3, 8, 128, dtype=torch.bfloat16, device=CUDA)
    k = torch.randn(sum(lens_k), 2, 128, dtype=torch.bfloat16, device=CUDA)
    cq, ck = cu_seqlens(lens_q, CUDA), cu_seqlens(lens_k, CUDA)
    out, lse = _gpu_lse_check(gpu_provider, "prefill", lambda b: attn_ops.prefill_with_lse(
        q, k, k, cq, ck, 123, 300, 0.09, causal, backend=b))
    if not causal:
        assert out[13:18].abs().sum() == 0 and torch.isneginf(lse[13:18]).all()
    assert out[-3:].abs().sum() == 0 and torch.isneginf(lse[-3:]).all()


@pytest.mark.cuda
def test_gpu_decode_with_lse(gpu_provider):
    lens = [0, 1, 300, 777, 13]
    batch = random_paged(lens, 2, 128, 256, torch.bfloat16, CUDA)
    q = torch.randn(len(lens), 8, 128, dtype=torch.bfloat16, device=CUDA)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=CUDA)
    out, lse = _gpu_lse_check(gpu_provider, "decode", lambda b: attn_ops.decode_with_lse(
        q, batch.k_cache, batch.v_cache, seqlens, batch.block_table, 0.09, backend=b),
        paged=True)
    assert out[0].abs().sum() == 0 and torch.isneginf(lse[0]).all()
