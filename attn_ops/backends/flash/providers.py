"""Which FlashAttention library serves a call: detection of the installed providers (import,
version, build flags, entry-point signatures) and the pure decision functions over them.

Nothing here launches a kernel; :mod:`.calls` holds the call adapters. Detection runs once per
process and never at import, so loading the backend looks up no flash package.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
from types import ModuleType

import torch

from attn_ops.contract import MAX_HEAD_DIM, OpConfig

PROVIDER_ORDER = ("fa3", "fa3_fwd", "fa2", "aten")
HALF_DTYPES = (torch.float16, torch.bfloat16)
FA2_PAGE_MULTIPLE = 256  # FA2's split-KV kernel reads pages in 256-token tiles
# The keywords of FA3's compiled forward (``fwd``, a torch op in fa3-fwd 0.0.3 and FA3 main) that
# the prefill adapter passes; an op with all of them is called directly, skipping the Python
# wrapper's autograd.Function and custom_op layers (host time, no extra kernel).
FA3_RAW_ARGS = frozenset({"q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                          "max_seqlen_k", "softmax_scale", "is_causal", "window_size_left",
                          "window_size_right", "softcap", "num_splits"})
# fa3-fwd 0.0.3's build flags (its fa3_fwd_config.CONFIG), used when the config is unreadable.
FA3_FWD_FLAGS = {"FLASHATTENTION_DISABLE_PAGEDKV": True, "FLASHATTENTION_DISABLE_LOCAL": True,
                 "FLASHATTENTION_DISABLE_SOFTCAP": False, "FLASHATTENTION_DISABLE_FP16": True}

NO_STORE = ("FlashAttention has no slot-mapped KV-cache write; store_kvcache runs on the "
            "triton or reference backend")
NO_MERGE = "merge_states is not an attention call (the triton and reference backends run it)"
# What the FP8 growth of issue 16 maps to, exactly, and why it is still refused.
NO_FP8 = ("FP8 KV cache: FA3's q_descale/k_descale/v_descale (float32 [B, Hkv] dequant "
          "multipliers, strides honoured) would carry the contract's k_scale/v_scale exactly (a "
          "[] or [Hkv] scale expanded to [B, Hkv] with stride 0; both multiply the stored value), "
          "but FA3 runs FP8 only with q, k and v all float8_e4m3fn (its flash_api checks "
          "k.dtype == q.dtype) and the contract reads the FP8 cache with fp16/bf16 queries: "
          "quantising q would change the result; fa3-fwd also has no paged KV (decode's cache); "
          "FA2 and aten have no FP8")
NO_SINKS = ("the FlashAttention entry points this backend calls (FA3/FA2 flash_attn_varlen_func "
            "and flash_attn_with_kvcache, fa3-fwd's fwd, aten._flash_attention_forward) take no "
            "per-head sink logits")
# FA2's flash_api.cpp checks only a contiguous last dim and passes a paged cache's page, row and
# head strides (stride(0), stride(-3), stride(-2)) to its kernels, so it may well read a
# transposed dense cache; its cp.async loads also need every row 16-byte aligned. Neither that nor
# FA3 / aten's copy has been run here on a strided cache, so such calls go to triton/reference.
NO_STRIDED_CACHE = ("the paged caches are not contiguous (a strided [num_blocks, block_size, "
                    "Hkv, D] view, e.g. a transposed [B, Hkv, S, D] cache); this backend hands "
                    "FlashAttention contiguous caches only (strided pages not validated on a "
                    "GPU here; the triton backend reads them through their strides)")


@dataclasses.dataclass(frozen=True, eq=False)
class Provider:
    """What one installed FlashAttention implementation can do (found by :func:`detect`).

    ``family`` is "fa3" (FA3 kernels: a row that sees no key gets output 0 and LSE -inf, written
    by the kernel) or "fa2" (FA2 kernels, also aten's: LSE +inf for such rows, split-KV decode
    rows with no key not promised finite). ``raw_fwd`` is FA3's compiled ``fwd`` op when it takes
    the keywords of :data:`FA3_RAW_ARGS`, else None (the Python entry points are called).
    """
    name: str
    label: str
    min_sm: int
    max_sm: int | None
    dtypes: tuple
    dense_prefill: bool
    paged_prefill: bool
    decode: bool
    page_multiple: int
    window: bool
    softcap: bool
    module: ModuleType | None = None
    notes: dict = dataclasses.field(default_factory=dict)  # feature -> why it is missing
    family: str = "fa2"
    lse_prefill: bool = False
    lse_decode: bool = False
    raw_fwd: object = None


# ---------------------------------------------------------------------------------------------
# Detection (once per process)
# ---------------------------------------------------------------------------------------------

def _params(fn) -> frozenset:
    """Argument names of a Python function or of a torch op (its schema)."""
    if fn is None:
        return frozenset()
    op = getattr(fn, "default", fn)  # an OpOverloadPacket's default overload
    schema = getattr(op, "_schema", None)
    if schema is not None:
        return frozenset(a.name for a in schema.arguments)
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _import(module: str, install_hint: str) -> ModuleType | str:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed ({install_hint})"
    try:
        return importlib.import_module(module)
    except Exception as e:  # a CUDA extension built for another torch raises OSError etc.
        return f"{module} could not be imported: {type(e).__name__}: {e}"


def _version(mod: ModuleType) -> str:
    return str(getattr(mod, "__version__", "unknown version"))


def raw_fwd(mod: ModuleType):
    """FA3's compiled forward op held by ``mod`` (fa3-fwd: ``fa3_fwd_cuda``; FA3 main:
    ``flash_attn_3_cuda``) when it takes every keyword the adapter passes, else None."""
    for attr in ("fa3_fwd_cuda", "flash_attn_3_cuda"):
        fwd = getattr(getattr(mod, attr, None), "fwd", None)
        if fwd is not None and FA3_RAW_ARGS <= _params(fwd):
            return fwd
    return None


def _fa3_provider(mod: ModuleType) -> Provider:
    varlen = _params(getattr(mod, "flash_attn_varlen_func", None))
    kv = _params(getattr(mod, "flash_attn_with_kvcache", None))
    paged = "page_table" in kv
    opts = varlen & kv if paged else varlen
    fwd = raw_fwd(mod)
    no_lse = f"this FA3 build's entry points return no softmax LSE"
    return Provider("fa3", f"FA3 ({mod.__name__} {_version(mod)})", 90, 90, HALF_DTYPES,
                    dense_prefill=bool(varlen) or fwd is not None, paged_prefill=paged and
                    {"cu_seqlens_q", "max_seqlen_q"} <= kv, decode=paged, page_multiple=1,
                    window="window_size" in opts, softcap="softcap" in opts, module=mod,
                    notes={"lse": no_lse}, family="fa3",
                    lse_prefill=fwd is not None or "return_attn_probs" in varlen,
                    lse_decode="return_softmax_lse" in kv, raw_fwd=fwd)


def _fa2_provider(mod: ModuleType) -> Provider:
    varlen = _params(getattr(mod, "flash_attn_varlen_func", None))
    kv = _params(getattr(mod, "flash_attn_with_kvcache", None))
    label = f"FA2 (flash_attn {_version(mod)})"
    old = f"{label} is too old: flash-attn >= 2.6 has it"
    return Provider("fa2", label, 80, None, HALF_DTYPES, dense_prefill=bool(varlen),
                    paged_prefill="block_table" in varlen, decode="block_table" in kv,
                    page_multiple=FA2_PAGE_MULTIPLE, window="window_size" in varlen & kv,
                    softcap="softcap" in varlen & kv, module=mod,
                    notes={"paged_prefill": old, "decode": old, "softcap": old,
                           "lse": f"{label} returns no softmax LSE from this entry point"},
                    lse_prefill="return_attn_probs" in varlen,
                    lse_decode="return_softmax_lse" in kv)


def _fa3_fwd_flags() -> dict:
    """fa3-fwd's build flags (``fa3_fwd_config.CONFIG``), or its 0.0.3 flags when unreadable."""
    try:
        return dict(importlib.import_module("fa3_fwd_config").CONFIG["build_flags"])
    except Exception:  # an older wheel without the config module
        return dict(FA3_FWD_FLAGS)


def _fa3_fwd_provider(mod: ModuleType, flags: dict | None = None) -> Provider:
    """The forward-only FA3 build from its build flags (0.0.3: no paged KV, no local attention,
    no fp16; softcap, FP8 and varlen compiled in)."""
    flags = dict(FA3_FWD_FLAGS if flags is None else flags)
    off = lambda feature: bool(flags.get(f"FLASHATTENTION_DISABLE_{feature}", True))  # noqa: E731
    why = f"the forward-only fa3-fwd {_version(mod)} build has no {{}} (built with " \
          f"FLASHATTENTION_DISABLE_{{}})"
    fwd = raw_fwd(mod)
    varlen = _params(getattr(mod, "flash_attn_varlen_func", None))
    return Provider("fa3_fwd", f"FA3 forward-only (fa3_fwd_interface {_version(mod)})", 90, 90,
                    (torch.bfloat16,) if off("FP16") else HALF_DTYPES, dense_prefill=True,
                    paged_prefill=False, decode=False, page_multiple=1, window=not off("LOCAL"),
                    softcap=not off("SOFTCAP"), module=mod, family="fa3",
                    lse_prefill=fwd is not None or "return_attn_probs" in varlen, raw_fwd=fwd,
                    notes={"paged_prefill": why.format("paged KV", "PAGEDKV"),
                           "decode": why.format("paged KV (decode reads the paged cache)",
                                                "PAGEDKV"),
                           "window": why.format("local attention", "LOCAL"),
                           "softcap": why.format("softcap", "SOFTCAP"),
                           "lse": "this fa3-fwd build's entry points return no softmax LSE"})


def aten_provider(arg_names, torch_version: str) -> Provider:
    """The aten provider from the argument names of ``aten::_flash_attention_forward``.

    torch 2.11: ``... scale, window_size_left, window_size_right, seqused_k, alibi_slopes``;
    torch 2.13 adds ``block_table`` and ``num_splits``. No version has softcap. The op always
    returns its logsumexp (FA2's, ``[H, total_q]`` for varlen).
    """
    names = frozenset(arg_names)
    paged = "block_table" in names
    label = f"FA2 inside PyTorch (aten._flash_attention_forward, torch {torch_version})"
    no_table = (f"torch {torch_version}'s aten._flash_attention_forward has no block_table "
                f"argument (torch >= 2.13 has it); the flash backend does not gather the paged "
                f"cache into a dense copy")
    return Provider("aten", label, 80, None, HALF_DTYPES, dense_prefill=True, paged_prefill=paged,
                    decode=paged, page_multiple=FA2_PAGE_MULTIPLE,
                    window="window_size_left" in names, softcap=False,
                    notes={"paged_prefill": no_table, "decode": no_table,
                           "softcap": "aten._flash_attention_forward has no softcap argument"},
                    lse_prefill=True, lse_decode=True)


def _detect_one(provider: str) -> Provider | str:
    if provider == "aten":
        if not torch.backends.cuda.is_flash_attention_available():
            return "this PyTorch build has no FlashAttention kernels"
        schema = torch.ops.aten._flash_attention_forward.default._schema
        return aten_provider([a.name for a in schema.arguments], torch.__version__)
    spec = {"fa3": ("flash_attn_interface", "build flash-attention/hopper", _fa3_provider),
            "fa2": ("flash_attn", "pip install flash-attn", _fa2_provider),
            "fa3_fwd": ("fa3_fwd_interface", "pip install fa3-fwd",
                        lambda mod: _fa3_fwd_provider(mod, _fa3_fwd_flags()))}
    module, hint, make = spec[provider]
    mod = _import(module, hint)
    return mod if isinstance(mod, str) else make(mod)


@functools.lru_cache(maxsize=1)
def detect() -> tuple:
    """``((provider_name, Provider or reason-it-is-absent), ...)`` in :data:`PROVIDER_ORDER`."""
    return tuple((p, _detect_one(p)) for p in PROVIDER_ORDER)


# ---------------------------------------------------------------------------------------------
# Decisions (pure functions of the config, the GPU capability and the providers)
# ---------------------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def provider_reason(p: Provider, config: OpConfig, capability: tuple) -> str | None:
    """None when provider ``p`` runs the call ``config`` describes on a GPU of ``capability``."""
    op = config.op
    sm = capability[0] * 10 + capability[1]
    if sm < p.min_sm or (p.max_sm is not None and sm > p.max_sm):
        need = f"sm{p.min_sm}" + ("+" if p.max_sm is None else "" if p.max_sm == p.min_sm
                                  else f"..sm{p.max_sm}")
        return f"{p.label} needs {need} (this GPU is sm{sm})"
    if config.dtype not in p.dtypes:
        return (f"{p.label} takes {'/'.join(_dtype_name(d) for d in p.dtypes)} only "
                f"(got {_dtype_name(config.dtype)})")
    paged = op == "decode" or config.paged
    feature = "decode" if op == "decode" else "paged_prefill" if paged else "dense_prefill"
    if not getattr(p, feature):
        return p.notes.get(feature, f"{p.label} has no {feature.replace('_', ' ')} kernel")
    if paged and config.block_size % p.page_multiple:
        return (f"{p.label} reads paged KV in {p.page_multiple}-token pages: block_size must be "
                f"a multiple of {p.page_multiple} (got {config.block_size})")
    if config.window_left >= 0 and not p.window:
        return p.notes.get("window", f"{p.label} has no sliding-window (local) attention")
    if config.softcap > 0 and not p.softcap:
        return p.notes.get("softcap", f"{p.label} has no softcap")
    if config.with_lse and not (p.lse_decode if op == "decode" else p.lse_prefill):
        return p.notes.get("lse", f"{p.label} returns no softmax LSE")
    return None


def choose(config: OpConfig, capability: tuple, providers: tuple,
           forced: str | None = None) -> tuple[Provider | None, str | None]:
    """The first provider (in ``providers`` order) that serves ``config``, or None and why not."""
    op = config.op
    if op not in ("prefill", "decode"):
        return None, NO_MERGE if op == "merge_states" else NO_STORE
    if config.fp8_cache:
        return None, NO_FP8
    if config.has_sinks:
        return None, NO_SINKS
    if not config.cache_contiguous:
        return None, NO_STRIDED_CACHE
    if config.dtype not in HALF_DTYPES:
        return None, (f"FlashAttention kernels take float16/bfloat16 only (got "
                      f"{_dtype_name(config.dtype)})")
    if config.head_dim > MAX_HEAD_DIM:
        return None, (f"FlashAttention supports head dims up to {MAX_HEAD_DIM} (got "
                      f"{config.head_dim})")
    if forced is not None and forced not in PROVIDER_ORDER:
        return None, f"ATTN_OPS_FLASH_IMPL={forced!r} is not one of {', '.join(PROVIDER_ORDER)}"
    reasons = []
    for pname, p in providers:
        if forced is not None and pname != forced:
            continue
        reason = p if isinstance(p, str) else provider_reason(p, config, capability)
        if reason is None:
            return p, None
        reasons.append(f"[{pname}] {reason}")
    return None, "no FlashAttention kernel fits: " + "; ".join(reasons)
