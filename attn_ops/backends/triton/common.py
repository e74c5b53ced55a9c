"""Pieces shared by the Triton kernels: score transform, paged row gather, device facts, the
contract-growth arguments (the online softmax and the split merge are in :mod:`.softmax`, the
split-KV counters in :mod:`.split_counters`).

Imported only by the kernel modules (it imports triton).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait  # noqa: F401 (the kernels' PDL wait)

from attn_ops.backends.triton import interpreting

LOG2E = math.log2(math.e)


# Triton picks compiled or interpreted kernels when a kernel module is imported (at decoration),
# so the kernel modules read the mode once, here, rather than the environment on every call.
INTERPRET = interpreting()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Multiprocessors of CUDA device ``device_index``, read once (the query costs ~us)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sm_count(device: torch.device) -> int:
    """Multiprocessor count for ``device``; a nominal 4 under the interpreter (CPU tensors)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return sm_count(index)


def device_is_sm90(device: torch.device) -> bool:
    """``device`` is a Hopper (sm90) NVIDIA GPU: the Gluon prefill runs there, and Triton issues
    wgmma for the unified kernel's 64-row tiles."""
    return _nvidia_capability(device) == (9, 0)


def _nvidia_capability(device: torch.device) -> tuple[int, int] | None:
    """``device``'s compute capability when it is an NVIDIA GPU, else None."""
    if device.type != "cuda" or torch.version.hip is not None:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index)


# Decode and store launched as programmatic dependents of the kernel before them in the stream
# (sm90+): their programs may be placed on the SMs as soon as every program of that kernel has
# exited, and wait (griddepcontrol.wait, each kernel's first instruction, before any load)
# until that kernel's memory is visible. What it saves is the gap between two kernels, not
# time in either, so it shows where a step's kernels run back to back (a captured decode
# step); a lone kernel, or the first node of a graph, has no such edge. H200, 20 calls in one
# graph, per call: decode B 16 x 2048 35.11 -> 34.81 us, 4 x 8192 36.24 -> 35.72; store then
# decode, B 16 x 2048 37.58 -> 37.08; one call per graph unchanged (BENCHMARKS.md,
# twenty-second pass). Read per call by the kernel wrappers, once per call
# signature by the op path's bound calls.
LAUNCH_PDL = True


def device_has_pdl(device: torch.device) -> bool:
    """``device`` can launch a kernel as a programmatic dependent of the one before it in its
    stream: sm90 and later, with CUDA 12.3 or later (whose stream capture records the dependency
    in a graph); not under the interpreter. See :data:`LAUNCH_PDL`."""
    if INTERPRET or _cuda_version() < (12, 3):
        return False
    capability = _nvidia_capability(device)
    return capability is not None and capability[0] >= 9


@functools.lru_cache(maxsize=None)
def _cuda_version() -> tuple[int, ...]:
    """The CUDA version torch was built with, as numbers ((0,) when it was built without)."""
    version = torch.version.cuda
    if not version:
        return (0,)
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def pdl_launch(on: bool) -> dict:
    """The keywords of a launch that is (``on``) or is not a programmatic dependent launch: the
    kernel's ``PDL`` constexpr (its ``gdc_wait()`` first) and Triton's ``launch_pdl`` option."""
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    """(major, minor) compute capability of CUDA device ``device_index``, read once."""
    return torch.cuda.get_device_capability(device_index)


def softcap_constants(scale: float, softcap: float) -> tuple[float, float, float]:
    """(qk_scale, cap_log2, cap_inv) for :func:`scores_log2`.

    Scores are kept in the log2 domain so the softmax uses ``exp2``: ``s * log2(e)`` with
    ``s = scale * q.k``, or, with a cap ``c``, ``c * log2(e) * tanh(scale * q.k / c)``.
    """
    qk_scale = scale * LOG2E
    if softcap > 0:
        return qk_scale, softcap * LOG2E, scale / softcap
    return qk_scale, 0.0, 0.0


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@triton.jit
def scores_log2(qk, qk_scale, cap_log2, cap_inv, SOFTCAP: tl.constexpr):
    """Raw fp32 dot products ``qk`` -> scaled (soft-capped) scores times log2(e)."""
    if SOFTCAP:
        # tanh(x) = 1 - 2 / (1 + e^(2x)); e^(2x) = 2^(2x log2 e). Saturates cleanly: e^(2x) = inf
        # gives 1, 0 gives -1. (No tanh in the interpreter's tl.math, hence the formula.)
        e2x = tl.math.exp2(qk * (cap_inv * 2.8853900817779268))
        return cap_log2 * (1.0 - 2.0 / (1.0 + e2x))
    else:
        return qk * qk_scale


def dot_mode(dtype: torch.dtype) -> str:
    """The DOT constexpr of the kernels: how ``tl.dot`` treats operands of ``dtype``.

    "ieee" for fp32 (exact fp32 products; tf32 would miss fp32 tolerances), "upcast" for bf16
    under the interpreter (Triton 3.9's interpreter multiplies bf16 operands as their raw uint16
    bits, so they are widened to fp32 first), else "tf32" (the default; unused by fp16/bf16).
    """
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and INTERPRET:
        return "upcast"
    return "tf32"


@triton.jit
def mma(a, b, acc, DOT: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation (acc may be None); DOT from :func:`dot_mode`."""
    if DOT == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT)


@triton.jit
def paged_offsets(table_row, stride_tc, pos, valid, stride_kb, stride_kt, stride_vb, stride_vt,
                  PAGE: tl.constexpr, SAME_STRIDES: tl.constexpr = False):
    """Element offsets (int64) of token positions ``pos`` in the K and V caches, through one
    block-table row whose columns are ``stride_tc`` apart.

    Block and in-page strides are separate, so a cache may be any strided
    ``[num_blocks, block_size, Hkv, D]`` view (a transposed dense ``[B, Hkv, S, D]`` cache has a
    block stride of ``Hkv * S * D`` but an in-page stride of ``D``). Positions where ``valid`` is
    False read no table entry and map to offset 0 (masked later), so garbage past a sequence's
    last block is never dereferenced. ``SAME_STRIDES`` (:func:`kv_same_strides`: V's block and
    in-page strides are K's): V's offsets are K's, computed once.
    """
    # Positions are never negative, and an unsigned quotient and remainder by a constexpr page
    # are a shift and a mask (signed, each takes four instructions). sm_90a, Triton 3.6,
    # instructions per 128-key step of the decode walk: FP8 deep 698 -> 648, WIDE 788 -> 654.
    # H200 graph replays (BENCHMARKS.md, twenty-first pass): few-query prefill B 16 x 2048,
    # 1 / 4 queries, 40.13 / 42.56 -> 39.58 / 41.98 us; one-token decode within 0.5%.
    upos = pos.to(tl.uint32)
    block = tl.load(table_row + (upos // PAGE).to(tl.int32) * stride_tc, mask=valid,
                    other=0).to(tl.int64)
    offset = (upos % PAGE).to(tl.int32)
    k_off = block * stride_kb + offset * stride_kt
    if SAME_STRIDES:
        # Each key's 64-bit offset is a product per row of a thread's loads: once, not once per
        # cache. sm_90a, Triton 3.6, instructions per step of the decode's key loop: WIDE 917 ->
        # 788, DEEP 612 -> 528, the default row 579 -> 496, FP8 deep 794 -> 738. H200, bf16
        # 32/8 heads, pages of 16, graph replays (BENCHMARKS.md, eighteenth pass): decode B 16
        # x 2048 39.1 -> 38.1 us, x 4096 68.5 -> 67.1, B 8 x 4096 40.0 -> 39.1, B 24 x 2048
        # 56.7 -> 55.7, B 64 x 1024 68.2 -> 67.4, x 4096 244.5 -> 242.9; FP8 B 64 x 4096 135.9
        # -> 133.9; the unified kernel, B 16 x 2048, 8 queries 47.2 -> 42.3, the mixed batch
        # (48 decode rows, 8 x 4 speculative, 2 chunks of 512 over 4k) 572.5 -> 505.5.
        return k_off, k_off
    return k_off, block * stride_vb + offset * stride_vt


def kv_same_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the K and V caches ``[blocks, page, Hkv, D]`` share their block and in-page
    strides, so one element offset per key addresses both (the ``KV_SAME_STRIDES`` every
    paged kernel takes: :func:`paged_offsets`). Strides only: a call signature fixes it."""
    return tuple(k_cache.stride()[:2]) == tuple(v_cache.stride()[:2])


class Extras(NamedTuple):
    """The contract-growth arguments of one prefill/decode launch, in the kernels' order."""
    lse: torch.Tensor | None  # float32 [rows, H], or None without return_lse
    pointers: tuple  # (LSE, SINK_LOGITS, K_SCALE, V_SCALE): q stands in for an unused one
    strides: tuple  # (stride of sinks, of k_scale, of v_scale): 0 for a scalar or unused
    flags: dict  # HAS_SINKS, FP8, WITH_LSE constexprs


def extras(q: torch.Tensor, k: torch.Tensor, sinks: torch.Tensor | None,
           k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
           return_lse: bool, lse: torch.Tensor | None = None) -> Extras:
    """Sinks (float32 ``[H]``), FP8 scales (float32 ``[]`` or ``[Hkv]``, used only when k is
    float8_e4m3fn) and the lse output (float32 ``[rows, H]``: ``lse``, contiguous, or allocated
    here) as kernel arguments; every input is read through its stride, never copied."""
    fp8 = k.dtype == torch.float8_e4m3fn
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError("k_scale, v_scale: a float8_e4m3fn cache needs float32 scales of "
                         "shape [] or [Hkv]")
    if not return_lse:
        lse = None
    elif lse is None:
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)

    def pick(t, use):
        return (t, t.stride(0) if t.dim() else 0) if use else (q, 0)

    (sk, s_sk), (ks, s_ks), (vs, s_vs) = (pick(sinks, sinks is not None),
                                          pick(k_scale, fp8), pick(v_scale, fp8))
    return Extras(lse, (q if lse is None else lse, sk, ks, vs), (s_sk, s_ks, s_vs),
                  dict(HAS_SINKS=sinks is not None, FP8=fp8, WITH_LSE=bool(return_lse)))


def result(out: torch.Tensor, ex: Extras, nothing_seen: bool = False):
    """``out``, or ``(out, lse)`` with ``return_lse``; ``nothing_seen``: zero out (and lse
    -inf) on the host side, for a call whose static shapes hold no key."""
    if nothing_seen:
        out.zero_()
        if ex.lse is not None:
            ex.lse.fill_(float("-inf"))
    return out if ex.lse is None else (out, ex.lse)
