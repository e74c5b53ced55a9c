"""The flash backend: supports() decisions and argument plumbing on CPU, kernels on a GPU.

CPU: the decisions are pure functions of (op, config, GPU capability, installed providers), so
they are tested with providers built from the real signatures of each version. The per-provider
call code runs against the stand-in kernels of tests/support/flash_fakes.py (FlashAttention's calling
conventions, computed with the reference backend, unwritten rows NaN), so a wrong argument
shows up as a wrong value.

GPU (``-m cuda``): every installed provider against the reference backend, with the CUDA
caching allocator poisoned with NaN first so unwritten output elements cannot pass.
"""

import importlib
import importlib.abc
import importlib.util
import sys

import pytest
import torch

import attn_ops
from attn_ops import registry
from attn_ops.contract import OpConfig
from attn_ops.backends import flash, reference
from attn_ops.backends.flash import calls
from tests.support.flash_fakes import (ATEN_211, ATEN_213, serve_with, stand_in_providers,
                                       FAKE_FA2, FAKE_FA3, FAKE_FA3_FWD, FAKE_FA3_RAW, NAN,
                                       aten_flash_forward, fa3_varlen, module)
from tests.support.helpers import TOLERANCES, assert_close, cu_seqlens, random_paged

CUDA = torch.device("cuda")
SM90, SM80, SM75 = (9, 0), (8, 0), (7, 5)


def _config(op="prefill", dtype=torch.bfloat16, d=128, paged=False, block_size=None,
            window_left=-1, softcap=0.0, device=CUDA):
    if op == "decode":
        return OpConfig("decode", device, dtype, d, 2, num_heads=8, block_size=block_size or 256,
                        paged=True, window_left=window_left, softcap=softcap)
    return OpConfig("prefill", device, dtype, d, 2, num_heads=8, paged=paged,
                    block_size=block_size if paged else None, window_left=window_left,
                    softcap=softcap)


PROVIDERS = stand_in_providers()


# ---------------------------------------------------------------------------------------------
# supports(): decisions (CPU)
# ---------------------------------------------------------------------------------------------

def test_cpu_tensors_store_and_fp32_are_refused_with_reasons():
    assert "CUDA device" in flash.supports(_config(device=torch.device("cpu")))
    assert "triton or reference" in flash.supports(
        OpConfig("store_kvcache", CUDA, torch.float16, 64, 2, block_size=16, paged=True,
                 slot_dtype=torch.int64))
    assert "float16/bfloat16 only" in flash.supports(_config("decode", torch.float32))
    if not torch.cuda.is_available():
        assert "not available" in flash.supports(_config())
    explained = registry.explain(_config(device=torch.device("cpu")))
    assert "CUDA device" in explained["flash"]


def test_explicit_flash_on_cpu_fails_loudly_through_the_op():
    q = torch.randn(5, 2, 32, dtype=torch.float16)
    cu = cu_seqlens([5])
    with pytest.raises(attn_ops.BackendUnavailable, match="'flash' cannot run prefill.*CUDA"):
        attn_ops.prefill(q, q, q, cu, cu, 5, 5, 0.2, backend="flash")


def test_aten_provider_follows_the_schema_of_each_torch_version():
    old, new = flash.aten_provider(ATEN_211, "2.11.0"), flash.aten_provider(ATEN_213, "2.13.0")
    assert old.dense_prefill and old.window and not old.softcap
    assert not old.paged_prefill and not old.decode
    assert new.paged_prefill and new.decode and new.page_multiple == 256
    providers = (("aten", old),)
    assert flash.choose(_config(), SM90, providers) == (old, None)
    for op, cfg in (("decode", _config("decode")), ("prefill", _config(paged=True,
                                                                       block_size=256))):
        p, reason = flash.choose(cfg, SM90, providers)
        assert p is None and "no block_table" in reason and "2.11.0" in reason
        assert "does not gather" in reason


@pytest.mark.parametrize("op,cfg,cap,expect", [
    ("decode", _config("decode", block_size=256), SM90, None),
    ("decode", _config("decode", block_size=16), SM90, "multiple of 256 (got 16)"),
    ("prefill", _config(paged=True, block_size=512), SM80, None),
    ("prefill", _config(window_left=7), SM80, None),
    ("prefill", _config(softcap=30.0), SM90, "no softcap argument"),
    ("prefill", _config(dtype=torch.float16), SM75, "needs sm80+ (this GPU is sm75)"),
    ("prefill", _config(d=512), SM90, "head dims up to 256"),
])
def test_aten_decisions(op, cfg, cap, expect):
    p, reason = flash.choose(cfg, cap, (("aten", PROVIDERS["aten"]),))
    assert (p is None) == (expect is not None)
    assert expect is None or expect in reason


def test_providers_are_tried_fastest_first_and_can_be_forced():
    fwd = flash._fa3_fwd_provider(module("fa3_fwd_interface", flash_attn_varlen_func=fa3_varlen))
    everything = {n: PROVIDERS[n] for n in ("fa3", "fa2", "aten")} | {"fa3_fwd": fwd}
    in_order = tuple((n, everything[n]) for n in flash.PROVIDER_ORDER)
    without_fa3 = in_order[1:]
    assert flash.choose(_config(), SM90, without_fa3)[0] is fwd  # FA3 kernels first
    assert flash.choose(_config(dtype=torch.float16), SM90, without_fa3)[0].name \
        == "fa2"  # the forward-only build has no fp16
    assert flash.choose(_config("decode"), SM90, without_fa3)[0].name == "fa2"
    providers = tuple((n, p) for n, p in in_order if n != "fa3_fwd")
    assert flash.choose(_config(), SM90, providers)[0].name == "fa3"
    assert flash.choose(_config(), SM80, providers)[0].name == "fa2"  # FA3: sm90
    assert flash.choose(_config("decode", block_size=16), SM90, providers)[0].name \
        == "fa3"  # FA3 pages are any size
    p, reason = flash.choose(_config("decode", block_size=16), SM80, providers)
    assert p is None and "[fa3] FA3" in reason and "sm90" in reason and "(got 16)" in reason
    assert flash.choose(_config(), SM90, providers, forced="aten")[0].name == "aten"
    assert "not one of" in flash.choose(_config(), SM90, providers, forced="fa4")[1]


def test_absent_and_old_packages_give_their_reason():
    old_fa2 = module("flash_attn", flash_attn_varlen_func=lambda q, k, v, cu_seqlens_q,
                      cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                      softmax_scale=None, causal=False, window_size=(-1, -1): None,
                      flash_attn_with_kvcache=lambda q, k_cache, v_cache, cache_seqlens=None,
                      block_table=None, window_size=(-1, -1): None)
    p = flash._fa2_provider(old_fa2)
    assert p.decode and not p.paged_prefill and not p.softcap
    assert "too old" in flash.choose(_config(softcap=5.0), SM90, (("fa2", p),))[1]
    absent = (("fa2", "flash_attn is not installed (pip install flash-attn)"),)
    assert "pip install flash-attn" in flash.choose(_config(), SM90, absent)[1]
    fwd = flash._fa3_fwd_provider(module("fa3_fwd_interface", flash_attn_varlen_func=fa3_varlen))
    only = (("fa3_fwd", fwd),)
    assert flash.choose(_config(), SM90, only)[0] is fwd
    assert "bfloat16 only" in flash.choose(_config(dtype=torch.float16), SM90, only)[1]
    assert "local attention" in flash.choose(_config(window_left=3), SM90, only)[1]
    assert "paged KV" in flash.choose(_config("decode"), SM90, only)[1]


def test_detection_reads_installed_modules(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", FAKE_FA2)
    p = flash._detect_one("fa2")
    assert p.name == "fa2" and p.module is FAKE_FA2 and "9.9.9" in p.label
    assert p.paged_prefill and p.decode and p.window and p.softcap
    monkeypatch.setitem(sys.modules, "flash_attn_interface", FAKE_FA3)
    p = flash._detect_one("fa3")
    assert p.paged_prefill and p.decode and p.page_multiple == 1 and p.softcap


class _ForbidFlashImports(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in ("flash_attn", "flash_attn_interface", "fa3_fwd_interface"):
            raise AssertionError(f"{fullname} was looked up")
        return None


def test_loading_the_module_and_cpu_decisions_never_look_up_flash_packages(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [_ForbidFlashImports()] + sys.meta_path)
    importlib.reload(flash)  # module-level code runs again under the guard
    assert "CUDA" in flash.supports(_config(device=torch.device("cpu")))
    assert "float16/bfloat16" in flash.supports(_config(dtype=torch.float32))
    with pytest.raises(AssertionError, match="flash_attn was looked up"):
        importlib.util.find_spec("flash_attn")  # the guard itself works


# ---------------------------------------------------------------------------------------------
# Per-provider plumbing against the stand-in kernels (CPU, float32: exact to the reference)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(params=sorted(PROVIDERS))
def provider(request, monkeypatch):
    p = PROVIDERS[request.param]
    serve_with(monkeypatch, p)
    return p


def _refused(p, op, **cfg) -> bool:
    """True when the provider can't serve this configuration; then its refusal is what is tested:
    the backend must decline through ``supports`` (auto falls back) rather than compute it."""
    reason = flash.provider_reason(p, _config(op, **cfg), SM90)
    if reason is None:
        return False
    assert isinstance(reason, str) and len(reason) > 10  # a reason a user can act on
    return True


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window,softcap", [(-1, 0.0), (2, 0.0), (-1, 3.0), (4, 2.0)])
def test_dense_prefill_plumbing(provider, causal, window, softcap):
    if _refused(provider, "prefill", window_left=window, softcap=softcap):
        return
    lens_q, lens_k = [3, 0, 5, 1], [8, 0, 5, 4]
    q = torch.randn(sum(lens_q) + 2, 4, 32)  # two rows past cu_seqlens_q[-1]
    k, v = torch.randn(sum(lens_k), 2, 32), torch.randn(sum(lens_k), 2, 32)
    args = (q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), 5, 8, 0.3, causal, None, window,
            softcap)
    expected = reference.prefill(*args)
    assert_close(flash.prefill(*args), expected, 1e-6, 1e-6)
    assert expected[-2:].abs().sum() == 0


def test_prefill_with_one_query_bound_does_not_fold_heads(provider):
    lens_q, lens_k = [0, 1, 1], [2, 3, 1]  # max_seqlen_q == 1 but cu_seqlens_q != 0..B
    q, k, v = torch.randn(3, 4, 32), torch.randn(6, 2, 32), torch.randn(6, 2, 32)
    args = (q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), 1, 3, 0.3)
    assert_close(flash.prefill(*args), reference.prefill(*args), 1e-6, 1e-6)


@pytest.mark.parametrize("window,softcap", [(-1, 0.0), (5, 0.0), (-1, 2.0)])
def test_paged_prefill_plumbing(provider, window, softcap):
    if _refused(provider, "prefill", paged=True, block_size=256, window_left=window,
                softcap=softcap):
        return
    lens_q, lens_k = [4, 0, 9], [300, 0, 9]
    batch = random_paged(lens_k, 2, 32, 256, torch.float32, table_width=3)
    q = torch.randn(sum(lens_q), 4, 32)
    args = (q, batch.k_cache, batch.v_cache, cu_seqlens(lens_q), cu_seqlens(lens_k), 9, 300,
            0.2, True, batch.block_table.long(), window, softcap)  # int64 table: converted
    assert_close(flash.prefill(*args), reference.prefill(*args), 1e-6, 1e-6)


@pytest.mark.parametrize("window,softcap", [(-1, 0.0), (3, 0.0), (-1, 4.0)])
def test_decode_plumbing(provider, window, softcap):
    if _refused(provider, "decode", window_left=window, softcap=softcap):
        return
    lens = [0, 5, 300, 1]
    batch = random_paged(lens, 2, 32, 256, torch.float32, table_width=2)
    q = torch.randn(len(lens), 4, 32)
    args = (q, batch.k_cache, batch.v_cache, torch.tensor(lens, dtype=torch.int32),
            batch.block_table, 0.25, window, softcap)
    out = flash.decode(*args)
    assert_close(out, reference.decode(*args), 1e-6, 1e-6)
    assert out[0].abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# GPU: the real kernels against the reference backend
# ---------------------------------------------------------------------------------------------

def _poison_allocator():
    """Fill the CUDA caching allocator's free blocks with NaN, so unwritten outputs show."""
    for numel in (1 << 27, *(1 << 18,) * 16):
        torch.full((numel,), NAN, device=CUDA, dtype=torch.float16)


@pytest.fixture(params=flash.PROVIDER_ORDER)
def gpu_provider(request, monkeypatch):
    found = dict(flash.detect())[request.param]
    if isinstance(found, str):
        pytest.skip(found)
    monkeypatch.setenv("ATTN_OPS_FLASH_IMPL", request.param)
    registry.clear_cache()
    yield found
    registry.clear_cache()


def _skip_unless_gpu(p, op, **cfg):
    cfg = _config(op, **cfg)
    reason = flash.provider_reason(p, cfg, torch.cuda.get_device_capability())
    if reason is not None:
        pytest.skip(reason)


def _flash_vs_reference(call, dtype):
    _poison_allocator()
    out = call("flash")
    atol, rtol = TOLERANCES[dtype]
    # FlashAttention rounds P to the input dtype before P @ V; the reference keeps fp32.
    assert_close(out, call("reference"), 2 * atol, 2 * rtol)
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lens_q,lens_k,h,hkv,d", [
    ([13], [13], 2, 2, 64), ([1, 7, 123], [1, 7, 123], 8, 2, 128),
    ([3, 0, 5], [8, 0, 5], 8, 2, 128), ([123, 40], [300, 40], 4, 1, 256),
    ([2, 4], [2, 4], 4, 1, 40)])
@pytest.mark.parametrize("causal,window,softcap", [
    (True, -1, 0.0), (False, -1, 0.0), (True, 3, 0.0), (False, 2, 0.0), (True, -1, 5.0)])
def test_gpu_dense_prefill(gpu_provider, dtype, lens_q, lens_k, h, hkv, d, causal, window, softcap):
    _skip_unless_gpu(gpu_provider, "prefill", dtype=dtype, d=d, window_left=window,
                     softcap=softcap)
    q = torch.randn(sum(lens_q) + 3, h, d, dtype=dtype, device=CUDA)  # 3 padded tail rows
    k = torch.randn(sum(lens_k), hkv, d, dtype=dtype, device=CUDA)
    v = torch.randn(sum(lens_k), hkv, d, dtype=dtype, device=CUDA)
    cq, ck = cu_seqlens(lens_q, CUDA), cu_seqlens(lens_k, CUDA)
    out = _flash_vs_reference(lambda b: attn_ops.prefill(
        q, k, v, cq, ck, max(lens_q), max(lens_k), d ** -0.5, causal, None, window, softcap,
        backend=b), dtype)
    assert out[-3:].abs().sum() == 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("window,softcap", [(-1, 0.0), (40, 0.0), (-1, 5.0)])
def test_gpu_paged_prefill(gpu_provider, dtype, block_size, window, softcap):
    _skip_unless_gpu(gpu_provider, "prefill", dtype=dtype, paged=True, block_size=block_size,
                     window_left=window, softcap=softcap)
    lens_q, lens_k = [5, 0, 123, 1], [300, 0, 123, 600]
    batch = random_paged(lens_k, 2, 128, block_size, dtype, CUDA)
    q = torch.randn(sum(lens_q), 8, 128, dtype=dtype, device=CUDA)
    cq, ck = cu_seqlens(lens_q, CUDA), cu_seqlens(lens_k, CUDA)
    _flash_vs_reference(lambda b: attn_ops.prefill(
        q, batch.k_cache, batch.v_cache, cq, ck, 123, 600, 0.09, True, batch.block_table,
        window, softcap, backend=b), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("window,softcap", [(-1, 0.0), (100, 0.0), (-1, 5.0)])
def test_gpu_decode(gpu_provider, dtype, block_size, window, softcap):
    _skip_unless_gpu(gpu_provider, "decode", dtype=dtype, block_size=block_size,
                     window_left=window, softcap=softcap)
    lens = [0, 1, 300, 777, 13]
    batch = random_paged(lens, 2, 128, block_size, dtype, CUDA)
    q = torch.randn(len(lens), 8, 128, dtype=dtype, device=CUDA)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=CUDA)
    out = _flash_vs_reference(lambda b: attn_ops.decode(
        q, batch.k_cache, batch.v_cache, seqlens, batch.block_table, 0.09, window, softcap,
        backend=b), dtype)
    assert out[0].abs().sum() == 0


@pytest.mark.cuda
def test_gpu_decode_replays_in_a_cuda_graph(gpu_provider, monkeypatch):
    _skip_unless_gpu(gpu_provider, "decode", dtype=torch.bfloat16, block_size=256)
    monkeypatch.setenv("ATTN_OPS_CHECK", "0")
    batch = random_paged([600, 600, 600], 2, 128, 256, torch.bfloat16, CUDA)
    q = torch.randn(3, 8, 128, dtype=torch.bfloat16, device=CUDA)
    seqlens = torch.tensor([5, 0, 600], dtype=torch.int32, device=CUDA)
    args = (q, batch.k_cache, batch.v_cache, seqlens, batch.block_table, 0.09)
    attn_ops.decode(*args, backend="flash")  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn_ops.decode(*args, backend="flash")
    q.copy_(torch.randn_like(q))
    seqlens.copy_(torch.tensor([600, 77, 0], dtype=torch.int32))
    graph.replay()
    expected = attn_ops.decode(*args, backend="reference")
    assert_close(out, expected, *(2 * t for t in TOLERANCES[torch.bfloat16]))
    assert out[2].abs().sum() == 0
