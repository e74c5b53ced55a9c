"""Flash backend: FlashAttention kernels from the flash-attn packages or from PyTorch itself.

Four providers, each optional, tried in this fixed order (fastest first, by the H100 reference
figures of docs/measuring.md: FA3 608 vs FA2 330 TFLOP/s on causal bf16 prefill; FA3
1145-2892 vs FA2 1032-2435 GB/s on decode):

  provider  kernels                                  arch   dtypes     paged KV    window  softcap
  fa3       flash_attn_interface (FA3)               sm90   fp16/bf16  any block   yes     yes
  fa3_fwd   fa3_fwd_interface (forward-only FA3)     sm90   bf16       no          no      no
  fa2       flash_attn package (FA2)                 sm80+  fp16/bf16  bs % 256    yes     >= 2.6
  aten      torch.ops.aten._flash_attention_forward  sm80+  fp16/bf16  bs % 256 *  yes     no

  * torch >= 2.13 only: the op gains ``block_table`` there.

Paged prefill/decode through ``aten`` needs the op's ``block_table`` argument (torch >= 2.13;
torch 2.11 has none): without it :func:`supports` says so instead of gathering the cache into a
dense copy. ``ATTN_OPS_FLASH_IMPL=<provider>`` restricts the backend to one provider (for
benchmarks; call ``attn_ops.registry.clear_cache()`` after changing it).

Semantics are the op contract's (bottom-right causal, ``window_left`` with right window 0 when
causal and unlimited otherwise, softcap, GQA). Rows no sequence owns (``cu_seqlens_q[-1] <= t``)
and decode rows with ``seqlens_k == 0`` are zeroed with ``torch.where`` (no host sync): the
kernels leave unowned rows unwritten, and an empty split-KV row is not guaranteed finite
across versions. The extra pass reads and writes the output once: estimated from the 3027 GB/s
copy ceiling of docs/measuring.md, ~90 us on a causal bf16 4x4096-token, 32-head prefill (~3.3 ms at
330 TFLOP/s, so ~3%), and one small launch per decode step.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import os
from types import ModuleType

import torch
import torch.nn.functional as F

from attn_ops.contract import MAX_HEAD_DIM, OpConfig, decode_config, prefill_config
from attn_ops.registry import BackendUnavailable

name = "flash"

PROVIDER_ORDER = ("fa3", "fa3_fwd", "fa2", "aten")
HALF_DTYPES = (torch.float16, torch.bfloat16)
FA2_PAGE_MULTIPLE = 256  # FA2's split-KV kernel reads pages in 256-token tiles

_NO_STORE = ("FlashAttention has no slot-mapped KV-cache write; store_kvcache runs on the "
             "triton or reference backend")
_NO_MERGE = "merge_states is not an attention call (the triton and reference backends run it)"
# What the contract growth of issue 16 maps to here, and why each part is refused for now.
_NO_FP8 = ("FA3's FP8 path (q_descale/k_descale/v_descale, each [B, Hkv]) needs q, k and v all in "
           "float8_e4m3fn; the contract reads an FP8 cache with fp16/bf16 queries, which no "
           "FlashAttention provider serves (quantising q would change the result); FA2 and "
           "aten have no FP8")
_NO_SINKS = ("the FlashAttention entry points this backend calls (flash_attn_varlen_func, "
             "flash_attn_with_kvcache, aten._flash_attention_forward) take no per-head sink "
             "logits")
# FA2's flash_api.cpp checks only a contiguous last dim and passes a paged cache's page, row and
# head strides (stride(0), stride(-3), stride(-2)) to its kernels, so it may well read a
# transposed dense cache; its cp.async loads also need every row 16-byte aligned. Neither that nor
# FA3 / aten's copy has been run here on a strided cache, so such calls go to triton/reference.
_NO_STRIDED_CACHE = ("the paged caches are not contiguous (a strided [num_blocks, block_size, "
                     "Hkv, D] view, e.g. a transposed [B, Hkv, S, D] cache); this backend hands "
                     "FlashAttention contiguous caches only (strided pages not validated on a "
                     "GPU here; the triton backend reads them through their strides)")
_NO_LSE = ("the log-sum-exp of the FlashAttention kernels (FA2/FA3 return_softmax_lse, aten's "
           "logsumexp; [H, total_q] for varlen) is not wired into prefill_with_lse / "
           "decode_with_lse yet")


@dataclasses.dataclass(frozen=True, eq=False)
class Provider:
    """What one installed FlashAttention implementation can do (found by :func:`detect`)."""
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


# ---------------------------------------------------------------------------------------------
# Detection (once per process) and the pure decision functions
# ---------------------------------------------------------------------------------------------

def _params(fn) -> frozenset:
    try:
        return frozenset(inspect.signature(fn).parameters) if fn is not None else frozenset()
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


def _fa3_provider(mod: ModuleType) -> Provider:
    varlen = _params(getattr(mod, "flash_attn_varlen_func", None))
    kv = _params(getattr(mod, "flash_attn_with_kvcache", None))
    paged = "page_table" in kv
    opts = varlen & kv if paged else varlen
    return Provider("fa3", f"FA3 ({mod.__name__} {_version(mod)})", 90, 90, HALF_DTYPES,
                    dense_prefill=bool(varlen), paged_prefill=paged and
                    {"cu_seqlens_q", "max_seqlen_q"} <= kv, decode=paged, page_multiple=1,
                    window="window_size" in opts, softcap="softcap" in opts, module=mod)


def _fa2_provider(mod: ModuleType) -> Provider:
    varlen = _params(getattr(mod, "flash_attn_varlen_func", None))
    kv = _params(getattr(mod, "flash_attn_with_kvcache", None))
    label = f"FA2 (flash_attn {_version(mod)})"
    old = f"{label} is too old: flash-attn >= 2.6 has it"
    return Provider("fa2", label, 80, None, HALF_DTYPES, dense_prefill=bool(varlen),
                    paged_prefill="block_table" in varlen, decode="block_table" in kv,
                    page_multiple=FA2_PAGE_MULTIPLE, window="window_size" in varlen & kv,
                    softcap="softcap" in varlen & kv, module=mod,
                    notes={"paged_prefill": old, "decode": old, "softcap": old})


def _fa3_fwd_provider(mod: ModuleType) -> Provider:
    why = "the forward-only fa3-fwd build has no {} (it ships dense bf16 kernels only)"
    return Provider("fa3_fwd", f"FA3 forward-only (fa3_fwd_interface {_version(mod)})", 90, 90,
                    (torch.bfloat16,), dense_prefill=True, paged_prefill=False, decode=False,
                    page_multiple=1, window=False, softcap=False, module=mod,
                    notes={"paged_prefill": why.format("paged KV"),
                           "decode": why.format("paged KV (decode reads the paged cache)"),
                           "window": why.format("local attention"),
                           "softcap": why.format("softcap")})


def aten_provider(arg_names, torch_version: str) -> Provider:
    """The aten provider from the argument names of ``aten::_flash_attention_forward``.

    torch 2.11: ``... scale, window_size_left, window_size_right, seqused_k, alibi_slopes``;
    torch 2.13 adds ``block_table`` and ``num_splits``. No version has softcap.
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
                           "softcap": "aten._flash_attention_forward has no softcap argument"})


def _detect_one(provider: str) -> Provider | str:
    if provider == "aten":
        if not torch.backends.cuda.is_flash_attention_available():
            return "this PyTorch build has no FlashAttention kernels"
        schema = torch.ops.aten._flash_attention_forward.default._schema
        return aten_provider([a.name for a in schema.arguments], torch.__version__)
    spec = {"fa3": ("flash_attn_interface", "build flash-attention/hopper", _fa3_provider),
            "fa2": ("flash_attn", "pip install flash-attn", _fa2_provider),
            "fa3_fwd": ("fa3_fwd_interface", "pip install fa3-fwd", _fa3_fwd_provider)}
    module, hint, make = spec[provider]
    mod = _import(module, hint)
    return mod if isinstance(mod, str) else make(mod)


@functools.lru_cache(maxsize=1)
def detect() -> tuple:
    """``((provider_name, Provider or reason-it-is-absent), ...)`` in :data:`PROVIDER_ORDER`."""
    return tuple((p, _detect_one(p)) for p in PROVIDER_ORDER)


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
    return None


def choose(config: OpConfig, capability: tuple, providers: tuple,
           forced: str | None = None) -> tuple[Provider | None, str | None]:
    """The first provider (in ``providers`` order) that serves ``config``, or None and why not."""
    op = config.op
    if op not in ("prefill", "decode"):
        return None, _NO_MERGE if op == "merge_states" else _NO_STORE
    if config.fp8_cache:
        return None, _NO_FP8
    if config.has_sinks:
        return None, _NO_SINKS
    if config.with_lse:
        return None, _NO_LSE
    if not config.cache_contiguous:
        return None, _NO_STRIDED_CACHE
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


# ---------------------------------------------------------------------------------------------
# Backend interface
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple:
    return tuple(torch.cuda.get_device_capability(index))


def _forced() -> str | None:
    return os.environ.get("ATTN_OPS_FLASH_IMPL") or None


@functools.lru_cache(maxsize=1024)
def _plan(config: OpConfig, forced: str | None) -> tuple[Provider | None, str | None]:
    device = config.device
    if device.type != "cuda":
        return None, f"FlashAttention kernels need a CUDA device (got {device.type})"
    if config.op != "store_kvcache" and config.dtype in HALF_DTYPES:
        if not torch.cuda.is_available():
            return None, "CUDA is not available here (torch.cuda.is_available() is False)"
        index = device.index if device.index is not None else torch.cuda.current_device()
        return choose(config, _capability(index), detect(), forced)
    return choose(config, (0, 0), (), forced)  # the reason, without importing anything


def supports(config: OpConfig) -> str | None:
    """None when a FlashAttention provider serves the call ``config`` describes, else why."""
    return _plan(config, _forced())[1]


def describe(config: OpConfig) -> str:
    """The provider serving ``config`` (for benchmark tables), or why none does."""
    provider, reason = _plan(config, _forced())
    return provider.label if provider is not None else f"unavailable: {reason}"


def _provider(config: OpConfig) -> Provider:
    provider, reason = _plan(config, _forced())
    if provider is None:
        raise BackendUnavailable(f"attn backend 'flash' cannot run {config.op}: {reason}")
    return provider


def bind(config: OpConfig):
    """The op function for ``config`` with its provider chosen once (the registry memoises it)."""
    if config.op == "store_kvcache":
        return store_kvcache
    run = _prefill_on if config.op == "prefill" else _decode_on
    return functools.partial(run, _provider(config))


def store_kvcache(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Not offered (see :func:`supports`); the registry never routes store_kvcache here."""
    raise BackendUnavailable(f"attn backend 'flash' cannot run store_kvcache: {_NO_STORE}")


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
            causal: bool = True, block_table: torch.Tensor | None = None, window_left: int = -1,
            softcap: float = 0.0) -> torch.Tensor:
    """Varlen attention. q ``[Tq, H, D]`` fp16/bf16; k/v ``[Tk, Hkv, D]`` or paged caches
    ``[num_blocks, block_size, Hkv, D]`` with ``block_table`` ``[B, W]``. Out ``[Tq, H, D]``."""
    return _prefill_on(_provider(prefill_config(q, k, causal, block_table, window_left, softcap)),
                       q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                       causal, block_table, window_left, softcap)


def _prefill_on(provider: Provider, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                max_seqlen_k, scale, causal=True, block_table=None, window_left=-1, softcap=0.0):
    if cu_seqlens_q.shape[0] <= 1 or q.shape[0] == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return torch.zeros_like(q)  # no sequence or no key anywhere: every row sees nothing
    table = None if block_table is None else _int32(block_table)
    # FA2 treats max_seqlen_q == 1 with GQA as "one query per sequence, sequence b at row b" and
    # folds the query heads into rows: wrong when a sequence has no query or rows past
    # cu_seqlens_q[-1] exist. The bound only sizes the grid, so prefill passes at least 2.
    max_q = max(max_seqlen_q, 2)
    run = _PREFILL[provider.name]
    out = run(provider.module, q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
              max_q, max_seqlen_k, scale, causal, table, _window(causal, window_left), softcap)
    rows = torch.arange(q.shape[0], device=q.device, dtype=torch.int32)
    owned = rows < cu_seqlens_q[-1]
    return torch.where(owned[:, None, None], out, 0.0)


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens_k: torch.Tensor,
           block_table: torch.Tensor, scale: float, window_left: int = -1,
           softcap: float = 0.0) -> torch.Tensor:
    """One query per sequence. q ``[B, H, D]`` fp16/bf16; paged caches; seqlens_k ``[B]`` int32.
    Out ``[B, H, D]``; rows with ``seqlens_k == 0`` are zero."""
    return _decode_on(_provider(decode_config(q, k_cache, window_left, softcap)), q, k_cache,
                      v_cache, seqlens_k, block_table, scale, window_left, softcap)


def _decode_on(provider: Provider, q, k_cache, v_cache, seqlens_k, block_table, scale,
               window_left=-1, softcap=0.0):
    if q.shape[0] == 0 or block_table.shape[1] == 0:
        return torch.zeros_like(q)
    run = _DECODE[provider.name]
    out = run(provider.module, q, k_cache, v_cache, seqlens_k.contiguous(), _int32(block_table),
              scale, _window(True, window_left), softcap)
    return torch.where((seqlens_k > 0)[:, None, None], out, 0.0)


# ---------------------------------------------------------------------------------------------
# Per-provider calls (arguments already checked against the contract and supports())
# ---------------------------------------------------------------------------------------------

def _int32(block_table: torch.Tensor) -> torch.Tensor:
    """FlashAttention reads int32 block tables with a contiguous last dim."""
    return block_table.to(torch.int32).contiguous()


def _window(causal: bool, window_left: int) -> tuple[int, int]:
    """The contract's window as FlashAttention's (left, right): right 0 when causal, else -1."""
    return (window_left, 0 if causal else -1) if window_left >= 0 else (-1, -1)


def _options(window: tuple, softcap: float, **kw) -> dict:
    """Keyword options, naming window/softcap only when set (older builds lack the names)."""
    if window != (-1, -1):
        kw["window_size"] = window
    if softcap > 0:
        kw["softcap"] = softcap
    return kw


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out  # some FA3 builds also return lse


def _fa2_prefill(mod, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, table, window, softcap):
    kw = _options(window, softcap, dropout_p=0.0, softmax_scale=scale, causal=causal)
    if table is not None:
        kw["block_table"] = table
    return mod.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


def _fa3_prefill(mod, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, table, window, softcap):
    kw = _options(window, softcap, softmax_scale=scale, causal=causal)
    if table is None:
        return _first(mod.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kw))
    lens_k = cu_k[1:] - cu_k[:-1]  # keys per sequence, read through the page table
    return _first(mod.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens_k, page_table=table,
                                              cu_seqlens_q=cu_q, max_seqlen_q=max_q, **kw))


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
    return _aten_flash_forward()(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, **kw)[0]


def _aten_prefill(mod, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, table, window, softcap):
    lens_k = None if table is None else cu_k[1:] - cu_k[:-1]
    return _aten_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, table, window, lens_k)


def _fa2_decode(mod, q, k_cache, v_cache, seqlens_k, table, scale, window, softcap):
    kw = _options(window, softcap, cache_seqlens=seqlens_k, block_table=table,
                  softmax_scale=scale, causal=True)
    return mod.flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, **kw)[:, 0]


def _fa3_decode(mod, q, k_cache, v_cache, seqlens_k, table, scale, window, softcap):
    kw = _options(window, softcap, cache_seqlens=seqlens_k, page_table=table,
                  softmax_scale=scale, causal=True)
    return _first(mod.flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, **kw))[:, 0]


def _aten_decode(mod, q, k_cache, v_cache, seqlens_k, table, scale, window, softcap):
    # Each sequence is one query row: cu_seqlens_q = 0..B; key lengths as cumulative offsets.
    b = q.shape[0]
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=q.device)
    cu_k = F.pad(torch.cumsum(seqlens_k, 0, dtype=torch.int32), (1, 0))
    max_k = table.shape[1] * k_cache.shape[1]
    return _aten_forward(q, k_cache, v_cache, cu_q, cu_k, 1, max_k, scale, True, table, window,
                         seqlens_k)


_PREFILL = {"fa3": _fa3_prefill, "fa2": _fa2_prefill, "fa3_fwd": _fa3_prefill,
            "aten": _aten_prefill}
_DECODE = {"fa3": _fa3_decode, "fa2": _fa2_decode, "aten": _aten_decode}
