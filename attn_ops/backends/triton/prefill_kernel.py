"""Varlen flash-attention forward (FA2-style online softmax, exp2 domain) for attn::prefill.

Grid ``(cdiv(max_seqlen_q, BLOCK_M), B + 1, H)``: program ``(i, b, h)`` computes one BLOCK_M tile
of query rows of sequence b, head h. Tiles are taken last-first (``i = 0`` is the sequence's last
tile, the one that sees the most keys under a causal mask) so the long causal tiles start early
and short ones fill the tail of the schedule. Programs past their sequence's tile count exit at
once. The extra ``b = B`` column zeroes the token rows past ``cu_seqlens_q[-1]`` (rows owned by no
sequence), so the output is fully written with no host sync and no memset.

Each tile walks its key range in three loops: masked tiles below the window, unmasked tiles (no
causal/window/bounds arithmetic: the bulk of the work), masked tiles at the diagonal and the end.
K/V come either from the packed ``[Tk, Hkv, D]`` tensors or, with a block table, from the paged
caches through a per-token block lookup (any page size).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from attn_ops.backends.triton.common import (dot_mode, interpreting, mma, next_pow2,
                                             paged_rows, scores_log2, softcap_constants)


@triton.jit
def _load_rows(ptrs, row_ok, dim_ok, MASK_ROWS: tl.constexpr, MASK_DIM: tl.constexpr):
    """Load a [rows, D_P2] tile, masking only what can be out of range (unmasked loads vectorise)."""
    if MASK_ROWS:
        if MASK_DIM:
            return tl.load(ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        else:
            return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if MASK_DIM:
            return tl.load(ptrs, mask=dim_ok[None, :], other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _attend_tile(acc, m_i, l_i, q, start, K, V, K_DESC, V_DESC, desc_row, desc_col, table_row,
                 stride_kt, stride_vt, lk, q_pos, window_left, qk_scale, cap_log2, cap_inv,
                 offs_n, offs_d, dim_ok, MASKED: tl.constexpr, MASK_DIM: tl.constexpr,
                 CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                 PAGED: tl.constexpr, PAGE: tl.constexpr, DOT: tl.constexpr, TMA: tl.constexpr):
    """One BLOCK_N step of the online softmax: keys ``start .. start+BLOCK_N-1``."""
    pos = start + offs_n
    key_ok = pos < lk
    if TMA:  # whole in-bounds tiles of packed K/V through the tensor-memory accelerator
        k = K_DESC.load([desc_row + start, desc_col])
    else:
        if PAGED:
            rows = paged_rows(table_row, pos, key_ok, PAGE)
        else:
            rows = pos
        k = _load_rows(K + rows[:, None] * stride_kt + offs_d[None, :], key_ok, dim_ok, MASKED,
                       MASK_DIM)
    qk = mma(q, tl.trans(k), None, DOT)
    s = scores_log2(qk, qk_scale, cap_log2, cap_inv, SOFTCAP)
    if MASKED:
        ok = key_ok[None, :]
        if CAUSAL:
            ok = ok & (pos[None, :] <= q_pos[:, None])
        if WINDOW:
            ok = ok & (pos[None, :] >= q_pos[:, None] - window_left)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw no key yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if TMA:
        v = V_DESC.load([desc_row + start, desc_col])
    else:
        v = _load_rows(V + rows[:, None] * stride_vt + offs_d[None, :], key_ok, dim_ok, MASKED,
                       MASK_DIM)
    acc = acc * alpha[:, None]
    acc = mma(p.to(v.dtype), v, acc, DOT)
    return acc, m_new, l_i


@triton.jit
def _attend_range(acc, m_i, l_i, q, K, V, K_DESC, V_DESC, desc_row, desc_col, table_row,
                  stride_kt, stride_vt, lo, hi, lk, q_pos, window_left, qk_scale, cap_log2,
                  cap_inv, offs_n, offs_d, dim_ok, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  MASK_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                  SOFTCAP: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
                  DOT: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) over keys ``lo .. hi-1`` in BLOCK_N steps.

    ``q_pos[r]`` is query row r's own position in key coordinates (``i + lk - lq``). With
    ``MASKED`` False every key of every step must be valid and visible to every row; only such
    steps may use TMA (``TMA``) and warp specialisation (``WS``).
    """
    if WS:
        for start in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, start, K, V, K_DESC, V_DESC, desc_row, desc_col, table_row,
                stride_kt, stride_vt, lk, q_pos, window_left, qk_scale, cap_log2, cap_inv,
                offs_n, offs_d, dim_ok, MASKED, MASK_DIM, CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE,
                DOT, TMA)
    else:
        for start in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, start, K, V, K_DESC, V_DESC, desc_row, desc_col, table_row,
                stride_kt, stride_vt, lk, q_pos, window_left, qk_scale, cap_log2, cap_inv,
                offs_n, offs_d, dim_ok, MASKED, MASK_DIM, CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE,
                DOT, TMA)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["total_q", "window_left"])
def _prefill_kernel(Q, K, V, K_DESC, V_DESC, O, CU_Q, CU_K, TABLE,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_ot, stride_oh, stride_tb, total_q, num_seqs,
                    qk_scale, cap_log2, cap_inv, window_left,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_P2: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PAGED: tl.constexpr,
                    PAGE: tl.constexpr, DOT: tl.constexpr, TMA: tl.constexpr,
                    WS: tl.constexpr):
    pid = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_P2)
    dim_ok = offs_d < HEAD_DIM
    MASK_DIM: tl.constexpr = HEAD_DIM != D_P2

    if seq == num_seqs:  # zero the rows past cu_seqlens_q[-1], strided over the pid axis
        zeros = tl.zeros([BLOCK_M, D_P2], dtype=O.dtype.element_ty)
        first = tl.load(CU_Q + num_seqs)
        for r0 in range(first + pid * BLOCK_M, total_q, tl.num_programs(0) * BLOCK_M):
            r = r0 + offs_m
            ptrs = O + r.to(tl.int64)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
            tl.store(ptrs, zeros, mask=(r < total_q)[:, None] & dim_ok[None, :])
        return

    q_start = tl.load(CU_Q + seq)
    lq = tl.load(CU_Q + seq + 1) - q_start
    tile = tl.cdiv(lq, BLOCK_M) - 1 - pid
    if tile < 0:
        return
    k_start = tl.load(CU_K + seq)
    lk = tl.load(CU_K + seq + 1) - k_start

    m0 = tile * BLOCK_M
    rows = m0 + offs_m
    row_ok = rows < lq
    q_rows = (q_start + rows).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    kv_head = head // GROUP
    if PAGED:
        k_base = K + kv_head * stride_kh
        v_base = V + kv_head * stride_vh
        table_row = TABLE + seq.to(tl.int64) * stride_tb
    else:
        k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
        table_row = TABLE

    # Bottom-right alignment: query row i sits at key position i + lk - lq.
    diag = lk - lq
    q_pos = rows + diag
    # Visible keys of the tile: [lo, hi). Keys in [f_lo, f_hi) are visible to every row.
    hi = lk
    full_hi = lk
    if CAUSAL:
        hi = tl.minimum(lk, m0 + BLOCK_M + diag)
        full_hi = tl.minimum(lk, m0 + diag + 1)
    lo = 0
    full_lo = 0
    if WINDOW:
        lo = tl.maximum(m0 + diag - window_left, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.maximum(m0 + BLOCK_M - 1 + diag - window_left, 0)
    f_lo = tl.maximum(lo, tl.cdiv(full_lo, BLOCK_N) * BLOCK_N)
    f_hi = tl.maximum(tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N, f_lo)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_P2], dtype=tl.float32)
    # Masked steps below the window, unmasked bulk (TMA / warp specialisation if enabled), masked
    # steps at the diagonal and the end.
    desc_col = kv_head * HEAD_DIM
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, K_DESC, V_DESC, k_start,
                                  desc_col, table_row, stride_kt, stride_vt, lo,
                                  tl.minimum(f_lo, hi), lk, q_pos, window_left, qk_scale,
                                  cap_log2, cap_inv, offs_n, offs_d, dim_ok, BLOCK_N, True,
                                  MASK_DIM, CAUSAL, WINDOW, SOFTCAP, PAGED, PAGE, DOT, False,
                                  False)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, K_DESC, V_DESC, k_start,
                                  desc_col, table_row, stride_kt, stride_vt, f_lo, f_hi, lk,
                                  q_pos, window_left, qk_scale, cap_log2, cap_inv, offs_n, offs_d,
                                  dim_ok, BLOCK_N, False, MASK_DIM, CAUSAL, WINDOW, SOFTCAP,
                                  PAGED, PAGE, DOT, TMA, WS)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, K_DESC, V_DESC, k_start,
                                  desc_col, table_row, stride_kt, stride_vt, f_hi, hi, lk, q_pos,
                                  window_left, qk_scale, cap_log2, cap_inv, offs_n, offs_d,
                                  dim_ok, BLOCK_N, True, MASK_DIM, CAUSAL, WINDOW, SOFTCAP, PAGED,
                                  PAGE, DOT, False, False)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that saw no key: acc = 0 -> zeros
    o_ptrs = O + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


class Config(NamedTuple):
    """Launch parameters of the prefill kernel. ``tma``: unmasked K/V tiles through tensor
    descriptors (Hopper's TMA); ``warp_specialize``: producer/consumer warps on that loop."""
    block_m: int
    block_n: int
    warps: int
    stages: int
    tma: bool = False
    warp_specialize: bool = False


# fp16/bf16 on CUDA by padded head dim. See BENCHMARKS.md ("Notes") for the measurements.
_CUDA_CONFIGS = {
    16: Config(128, 64, 4, 3),
    32: Config(128, 64, 4, 3),
    64: Config(128, 64, 8, 3),
    128: Config(128, 64, 8, 3),
    256: Config(128, 64, 8, 2),
}
# fp32 (ieee dots, 2x the bytes per tile): smaller tiles keep it within shared memory.
_CUDA_CONFIGS_FP32 = {16: Config(64, 32, 4, 2), 32: Config(64, 32, 4, 2),
                      64: Config(64, 32, 4, 2), 128: Config(64, 32, 4, 2),
                      256: Config(32, 32, 4, 1)}


def launch_config(head_dim: int, dtype: torch.dtype, causal: bool) -> Config:
    """A static table, never autotuned at run time (autotuning inside a CUDA graph capture
    would launch extra kernels into the graph)."""
    if interpreting():
        return Config(16, 16, 4, 1)  # tiny tiles: several per sequence exercise all three loops
    d_p2 = max(16, next_pow2(head_dim))
    table = _CUDA_CONFIGS_FP32 if dtype == torch.float32 else _CUDA_CONFIGS
    return table[d_p2]


def _descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int):
    """Tensor descriptors over packed K/V as 2-D ``[Tk, Hkv * D]`` with ``[BLOCK_N, D]`` boxes,
    or None when the layout does not allow TMA (heads not adjacent, misaligned, no support)."""
    head_dim = k.shape[2]
    if (k.device.type != "cuda" or interpreting() or head_dim != next_pow2(head_dim)
            or torch.cuda.get_device_capability(k.device)[0] < 9):
        return None
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    descs = []
    for t in (k, v):
        if (t.stride(1) != head_dim or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16):
            return None
        descs.append(TensorDescriptor(t, [t.shape[0], t.shape[1] * head_dim], [t.stride(0), 1],
                                      [block_n, head_dim]))
    return descs


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
            causal: bool = True, block_table: torch.Tensor | None = None, window_left: int = -1,
            softcap: float = 0.0, config: Config | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """q ``[Tq, H, D]``; k/v ``[Tk, Hkv, D]`` or paged caches ``[blocks, page, Hkv, D]`` with
    ``block_table`` ``[B, W]``; cu_seqlens ``[B+1]`` int32. Returns ``[Tq, H, D]`` in q's dtype.

    ``config`` overrides the static :class:`Config` table (benchmarks); ``out`` (contiguous
    ``[Tq, H, D]``) receives the result (tests poison it to catch unwritten elements).
    """
    total_q, num_heads, head_dim = q.shape
    num_seqs = cu_seqlens_q.shape[0] - 1
    paged = block_table is not None
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if total_q == 0:
        return out
    if k.numel() == 0 or num_seqs == 0 or (paged and block_table.numel() == 0):
        return out.zero_()  # no key anywhere (static shapes say so)
    cfg = Config(*(config or launch_config(head_dim, q.dtype, causal)))
    descs = None
    if paged:
        page, num_kv_heads = k.shape[1], k.shape[2]
        strides = (k.stride(1), k.stride(2), v.stride(1), v.stride(2))
        table, stride_tb = block_table, block_table.stride(0)
    else:
        page, num_kv_heads = 1, k.shape[1]
        strides = (k.stride(0), k.stride(1), v.stride(0), v.stride(1))
        table, stride_tb = cu_seqlens_k, 0  # unused pointer argument
        if cfg.tma:
            descs = _descriptors(k, v, cfg.block_n)
    k_desc, v_desc = descs or (k, v)  # unused pointers when TMA is off
    qk_scale, cap_log2, cap_inv = softcap_constants(scale, softcap)
    grid = (max(1, triton.cdiv(max_seqlen_q, cfg.block_m)), num_seqs + 1, num_heads)
    _prefill_kernel[grid](
        q, k, v, k_desc, v_desc, out, cu_seqlens_q, cu_seqlens_k, table,
        q.stride(0), q.stride(1), *strides, out.stride(0), out.stride(1), stride_tb, total_q,
        num_seqs, qk_scale, cap_log2, cap_inv, window_left,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, D_P2=max(16, next_pow2(head_dim)),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=bool(causal), WINDOW=window_left >= 0,
        SOFTCAP=softcap > 0, PAGED=paged, PAGE=page, DOT=dot_mode(q.dtype),
        TMA=descs is not None, WS=descs is not None and cfg.warp_specialize,
        num_warps=cfg.warps, num_stages=cfg.stages)
    return out
