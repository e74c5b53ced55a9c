"""Argument validation for the attn ops.

Two kinds of checks live here:

* Metadata checks (rank, shape, dtype, device, strides, head counts, head dim). They read only
  tensor metadata, so they run in the fake kernels too: a bad call fails at trace time under
  torch.compile / torch.export, not only in eager mode. They raise ``ValueError`` whose message
  names the argument and the expected shape.
* Data checks (slot and block ids in range, cu_seqlens monotonic, sequence lengths within the
  cache). They read device memory, which costs a host sync, so they run only when the environment
  variable ``ATTN_OPS_CHECK=1`` is set (the tests set it), never during CUDA graph capture, and
  never on fake tensors. They raise before any backend writes.
"""

from __future__ import annotations

import torch

from attn_ops import env
from attn_ops.contract import (FLOAT_DTYPES, FP8_DTYPES, FP8_QUERY_DTYPES, HEAD_DIM_MULTIPLE,
                               INDEX_DTYPES, MAX_HEAD_DIM)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _fail(msg: str) -> None:
    raise ValueError(msg)


def check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name}: expected a tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        _fail(f"{name}: expected a {rank}-D tensor of shape {layout}, got shape {_shape(t)}")


def check_dtype(name: str, t: torch.Tensor, allowed: tuple, what: str) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        _fail(f"{name}: expected {what} ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            _fail(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), "
                  f"got one on {t.device}")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        _fail(f"{name}: the last dim must be contiguous (stride 1), got strides "
              f"{tuple(t.stride())}")


def check_head_dim(name: str, d: int) -> None:
    if not (0 < d <= MAX_HEAD_DIM and d % HEAD_DIM_MULTIPLE == 0):
        _fail(f"{name}: unsupported head dim {d}; expected a multiple of {HEAD_DIM_MULTIPLE} "
              f"in [{HEAD_DIM_MULTIPLE}, {MAX_HEAD_DIM}]")


def check_gqa(q_name: str, h: int, kv_name: str, hkv: int) -> None:
    if hkv <= 0 or h % hkv != 0:
        _fail(f"{q_name} has {h} heads and {kv_name} has {hkv}: the query head count must be a "
              f"multiple of the kv head count (H % Hkv == 0)")


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, same shape/dtype, each any strided
    view with a contiguous last dim (their strides may differ; a dense ``[B, Hkv, S, D]`` cache
    transposed is one block per sequence)."""
    layout = "[num_blocks, block_size, Hkv, D]"
    check_rank("k_cache", k_cache, 4, layout)
    check_rank("v_cache", v_cache, 4, layout)
    if k_cache.shape != v_cache.shape:
        _fail(f"v_cache: expected the shape of k_cache {_shape(k_cache)} {layout}, "
              f"got {_shape(v_cache)}")
    if k_cache.dtype != v_cache.dtype:
        _fail(f"v_cache: expected dtype {k_cache.dtype} (that of k_cache), got {v_cache.dtype}")
    check_dtype("k_cache", k_cache, FLOAT_DTYPES + FP8_DTYPES, "a floating or FP8 dtype")
    check_same_device("k_cache", k_cache, v_cache=v_cache)
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.stride(-1) != 1:
            _fail(f"{name}: expected a {layout} view whose last dim (D) is contiguous (stride 1; "
                  f"the other strides are free), got strides {tuple(c.stride())}")
    check_head_dim("k_cache", k_cache.shape[-1])


def check_store_kvcache(key, value, k_cache, v_cache, slot_mapping, k_scale=None,
                        v_scale=None) -> None:
    """key, value ``[T, Hkv, D]``; caches ``[num_blocks, block_size, Hkv, D]``; slots ``[T]``;
    k_scale, v_scale float32 ``[]`` or ``[Hkv]``, required exactly when the caches are FP8."""
    check_cache_pair(k_cache, v_cache)
    _, _, hkv, d = k_cache.shape
    fp8 = k_cache.dtype in FP8_DTYPES
    for name, t in (("key", key), ("value", value)):
        check_rank(name, t, 3, "[T, Hkv, D]")
        if t.shape[1] != hkv or t.shape[2] != d:
            _fail(f"{name}: expected shape [T, {hkv}, {d}] (Hkv and D of k_cache), got {_shape(t)}")
        if fp8:
            check_dtype(name, t, FLOAT_DTYPES, f"a floating dtype to quantise into the "
                        f"{_dtype_name(k_cache.dtype)} cache")
        elif t.dtype != k_cache.dtype:
            _fail(f"{name}: expected dtype {k_cache.dtype} (that of k_cache), got {t.dtype}")
        check_last_dim_contiguous(name, t)
    if key.shape[0] != value.shape[0]:
        _fail(f"value: expected shape [{key.shape[0]}, {hkv}, {d}] (T of key), got {_shape(value)}")
    check_rank("slot_mapping", slot_mapping, 1, "[T]")
    check_dtype("slot_mapping", slot_mapping, INDEX_DTYPES, "an integer dtype")
    if slot_mapping.shape[0] != key.shape[0]:
        _fail(f"slot_mapping: expected shape [{key.shape[0]}] (T of key), got "
              f"{_shape(slot_mapping)}")
    check_same_device("k_cache", k_cache, key=key, value=value, slot_mapping=slot_mapping)
    check_kv_scales(k_cache, k_scale, v_scale)


def check_block_table(block_table: torch.Tensor, batch: int | None) -> None:
    check_rank("block_table", block_table, 2, "[B, max_blocks_per_seq]")
    check_dtype("block_table", block_table, INDEX_DTYPES, "an integer dtype")
    if batch is not None and block_table.shape[0] != batch:
        _fail(f"block_table: expected shape [{batch}, max_blocks_per_seq] (B sequences), "
              f"got {_shape(block_table)}")


def check_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                  block_table, window_left, softcap, sinks=None, k_scale=None,
                  v_scale=None) -> None:
    """q ``[Tq, H, D]``; k, v ``[Tk, Hkv, D]`` or, with ``block_table``, the paged caches;
    sinks float32 ``[H]``; k_scale, v_scale float32 ``[]``/``[Hkv]`` with FP8 k/v only."""
    check_rank("q", q, 3, "[Tq, H, D]")
    check_dtype("q", q, FLOAT_DTYPES, "a floating dtype")
    check_last_dim_contiguous("q", q)
    _, h, d = q.shape
    check_head_dim("q", d)
    if block_table is None:
        for name, t in (("k", k), ("v", v)):
            check_rank(name, t, 3, "[Tk, Hkv, D]")
            check_last_dim_contiguous(name, t)
        if k.shape != v.shape:
            _fail(f"v: expected the shape of k {_shape(k)} [Tk, Hkv, D], got {_shape(v)}")
        hkv = k.shape[1]
    else:
        check_cache_pair(k, v)
        hkv = k.shape[2]
    if k.shape[-1] != d:
        _fail(f"k: expected head dim {d} (that of q), got shape {_shape(k)}")
    _check_kv_dtype("k", k, q)
    if k.dtype != v.dtype:
        _fail(f"v: expected dtype {k.dtype} (that of k), got {v.dtype}")
    check_gqa("q", h, "k", hkv)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_rank(name, cu, 1, "[B+1]")
        check_dtype(name, cu, (torch.int32,), "int32")
        if cu.shape[0] < 1:
            _fail(f"{name}: expected shape [B+1] with B >= 0, got {_shape(cu)}")
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        _fail(f"cu_seqlens_k: expected shape [{cu_seqlens_q.shape[0]}] (that of cu_seqlens_q, "
              f"[B+1]), got {_shape(cu_seqlens_k)}")
    if block_table is not None:
        check_block_table(block_table, cu_seqlens_q.shape[0] - 1)
    check_same_device("q", q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                      block_table=block_table)
    _check_scalars(scale, window_left, softcap)
    check_sinks(sinks, q)
    check_kv_scales(k, k_scale, v_scale, "k")
    if not isinstance(max_seqlen_q, torch.SymInt) and max_seqlen_q < 0:
        _fail(f"max_seqlen_q: expected a non-negative upper bound, got {max_seqlen_q}")
    if not isinstance(max_seqlen_k, torch.SymInt) and max_seqlen_k < 0:
        _fail(f"max_seqlen_k: expected a non-negative upper bound, got {max_seqlen_k}")


def check_decode(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left, softcap,
                 sinks=None, k_scale=None, v_scale=None) -> None:
    """q ``[B, H, D]``; caches ``[num_blocks, block_size, Hkv, D]``; seqlens_k ``[B]``;
    sinks float32 ``[H]``; k_scale, v_scale float32 ``[]``/``[Hkv]`` with FP8 caches only."""
    check_rank("q", q, 3, "[B, H, D]")
    check_dtype("q", q, FLOAT_DTYPES, "a floating dtype")
    check_last_dim_contiguous("q", q)
    b, h, d = q.shape
    check_head_dim("q", d)
    check_cache_pair(k_cache, v_cache)
    if k_cache.shape[-1] != d:
        _fail(f"k_cache: expected head dim {d} (that of q), got shape {_shape(k_cache)}")
    _check_kv_dtype("k_cache", k_cache, q)
    check_gqa("q", h, "k_cache", k_cache.shape[2])
    check_rank("seqlens_k", seqlens_k, 1, "[B]")
    check_dtype("seqlens_k", seqlens_k, (torch.int32,), "int32")
    if seqlens_k.shape[0] != b:
        _fail(f"seqlens_k: expected shape [{b}] (B of q), got {_shape(seqlens_k)}")
    check_block_table(block_table, b)
    check_same_device("q", q, k_cache=k_cache, v_cache=v_cache, seqlens_k=seqlens_k,
                      block_table=block_table)
    _check_scalars(scale, window_left, softcap)
    check_sinks(sinks, q)
    check_kv_scales(k_cache, k_scale, v_scale)


def check_finite_scalars(scale, softcap) -> None:
    """scale and softcap must be finite: inf (or NaN) turns every output row into NaN."""
    for name, x in (("scale", scale), ("softcap", softcap)):
        if isinstance(x, (int, float)) and not float("-inf") < x < float("inf"):
            _fail(f"{name}: expected a finite float, got {x}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_kv_dtype(name: str, k: torch.Tensor, q: torch.Tensor) -> None:
    """k (and v, checked equal) in q's dtype, or FP8 read by an fp16/bf16 q."""
    if k.dtype in FP8_DTYPES:
        if q.dtype not in FP8_QUERY_DTYPES:
            _fail(f"q: a {_dtype_name(k.dtype)} {name} is read by float16/bfloat16 queries, got "
                  f"q of dtype {_dtype_name(q.dtype)}")
    elif k.dtype != q.dtype:
        _fail(f"{name}: expected dtype {q.dtype} (that of q) or float8_e4m3fn, got {k.dtype}")


def check_sinks(sinks: torch.Tensor | None, q: torch.Tensor) -> None:
    """sinks: None or float32 ``[H]`` (one logit per query head), on q's device."""
    if sinks is None:
        return
    h = q.shape[1]
    check_rank("sinks", sinks, 1, f"[H] = [{h}]")
    if sinks.shape[0] != h:
        _fail(f"sinks: expected shape [{h}] (H of q), got {_shape(sinks)}")
    check_dtype("sinks", sinks, (torch.float32,), "float32")
    check_same_device("q", q, sinks=sinks)


def check_kv_scales(k: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                    k_name: str = "k_cache") -> None:
    """k_scale, v_scale: float32 ``[]`` or ``[Hkv]`` on k's device, given exactly when k (the
    cache, or prefill's dense k) is FP8. They are device tensors: never read on the host."""
    hkv = k.shape[-2]
    fp8 = k.dtype in FP8_DTYPES
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            if fp8:
                _fail(f"{name}: required with a {_dtype_name(k.dtype)} {k_name} (a float32 "
                      f"tensor of shape [] or [{hkv}]; the cache holds x / scale)")
            continue
        if not fp8:
            _fail(f"{name}: only float8_e4m3fn caches take scales, but {k_name} is "
                  f"{_dtype_name(k.dtype)} (pass None)")
        if not isinstance(s, torch.Tensor) or not (s.dim() == 0 or tuple(s.shape) == (hkv,)):
            got = _shape(s) if isinstance(s, torch.Tensor) else type(s).__name__
            _fail(f"{name}: expected a float32 tensor of shape [] or [{hkv}] (Hkv of {k_name}), "
                  f"got {got}")
        check_dtype(name, s, (torch.float32,), "float32")
        check_same_device(k_name, k, **{name: s})


def check_merge_states(out_a, lse_a, out_b, lse_b) -> None:
    """out_a, out_b ``[N, H, D]`` one floating dtype; lse_a, lse_b float32 ``[N, H]``."""
    check_rank("out_a", out_a, 3, "[N, H, D]")
    check_dtype("out_a", out_a, FLOAT_DTYPES, "a floating dtype")
    check_last_dim_contiguous("out_a", out_a)
    n, h, d = out_a.shape
    check_rank("out_b", out_b, 3, f"[N, H, D] = [{n}, {h}, {d}]")
    if out_b.shape != out_a.shape:
        _fail(f"out_b: expected shape [{n}, {h}, {d}] (that of out_a), got {_shape(out_b)}")
    if out_b.dtype != out_a.dtype:
        _fail(f"out_b: expected dtype {out_a.dtype} (that of out_a), got {out_b.dtype}")
    check_last_dim_contiguous("out_b", out_b)
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        check_rank(name, lse, 2, f"[N, H] = [{n}, {h}]")
        if lse.shape != out_a.shape[:2]:
            _fail(f"{name}: expected shape [{n}, {h}] (N, H of out_a), got {_shape(lse)}")
        check_dtype(name, lse, (torch.float32,), "float32")
    check_same_device("out_a", out_a, out_b=out_b, lse_a=lse_a, lse_b=lse_b)


def _check_scalars(scale, window_left, softcap) -> None:
    check_finite_scalars(scale, softcap)
    if not scale > 0:
        _fail(f"scale: expected a positive float, got {scale}")
    if not isinstance(window_left, torch.SymInt) and window_left < -1:
        _fail(f"window_left: expected -1 (no window) or a non-negative count, got {window_left}")
    if not softcap >= 0:
        _fail(f"softcap: expected 0.0 (off) or a positive cap, got {softcap}")


# ---------------------------------------------------------------------------------------------
# Data checks (host sync; opt-in)
# ---------------------------------------------------------------------------------------------

# True when ATTN_OPS_CHECK is set to anything but "" or "0". The op path asks this first, on
# every call (a dict lookup and a set test, not os.environ.get: see attn_ops.env), and calls
# data_checks_enabled only when it says yes.
data_checks_requested = env.switch("ATTN_OPS_CHECK", off=("", "0"))
# The same question as a value and its off set, read by graph_passes' Triton lowering.
_env_check = env.reader("ATTN_OPS_CHECK")
_CHECK_OFF = (None, "", "0")


def data_checks_enabled(*tensors: torch.Tensor) -> bool:
    """True when ``ATTN_OPS_CHECK=1`` and the check can read real data without breaking a
    capture."""
    if not data_checks_requested():
        return False
    for t in tensors:
        if t is not None and (t.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(t)):
            return False
        if t is not None and t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
    return True


def _data_fail(msg: str) -> None:
    raise ValueError(msg + " (found by ATTN_OPS_CHECK=1)")


def check_slots_in_range(slot_mapping: torch.Tensor, num_slots: int) -> None:
    bad = (slot_mapping < -1) | (slot_mapping >= num_slots)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        _data_fail(f"slot_mapping[{i}] = {int(slot_mapping[i])} is out of range: expected -1 "
                   f"(skip) or a slot in [0, {num_slots}) = [0, num_blocks * block_size)")


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int | None, max_seqlen: int) -> None:
    if cu.shape[0] == 0:
        return
    if int(cu[0]) != 0:
        _data_fail(f"{name}[0] = {int(cu[0])}: expected 0")
    lens = cu[1:] - cu[:-1]
    if bool((lens < 0).any()):
        i = int((lens < 0).nonzero()[0, 0])
        _data_fail(f"{name} is not non-decreasing at index {i + 1}: {cu.tolist()}")
    if total is not None and int(cu[-1]) > total:
        _data_fail(f"{name}[-1] = {int(cu[-1])} exceeds the {total} rows of the token tensor")
    if lens.numel() and int(lens.max()) > max_seqlen:
        _data_fail(f"{name}: a sequence has {int(lens.max())} tokens, more than "
                   f"max_seqlen = {max_seqlen}")


def check_paged_lengths(lengths_name: str, lengths: torch.Tensor, block_table: torch.Tensor,
                        num_blocks: int, block_size: int) -> None:
    """Every sequence fits its block-table row, and every block it uses is a valid block id."""
    if lengths.numel() == 0:
        return
    capacity = block_table.shape[1] * block_size
    if bool((lengths < 0).any()) or bool((lengths > capacity).any()):
        i = int(((lengths < 0) | (lengths > capacity)).nonzero()[0, 0])
        _data_fail(f"{lengths_name}[{i}] = {int(lengths[i])} is outside [0, {capacity}] "
                   f"(block_table width {block_table.shape[1]} * block_size {block_size})")
    used = torch.arange(block_table.shape[1], device=lengths.device)[None, :] * block_size
    used = used < lengths.to(torch.int64)[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        _data_fail(f"block_table[{b}, {j}] = {int(block_table[b, j])} is not a block id in "
                   f"[0, {num_blocks}) but sequence {b} uses it ({lengths_name}[{b}] = "
                   f"{int(lengths[b])})")


def check_prefill_data(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       block_table, causal=True) -> None:
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, None if block_table is not None else k.shape[0],
                     max_seqlen_k)
    lq = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    lk = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    # Causal queries are the last lq of the lk tokens. Without a mask every query sees every key,
    # so lq > lk is meaningful: a part of a split key set (cascade / context-parallel attention,
    # whose parts merge_states combines).
    if causal and bool((lq > lk).any()):
        i = int((lq > lk).nonzero()[0, 0])
        _data_fail(f"sequence {i} has {int(lq[i])} queries but only {int(lk[i])} keys: "
                   f"causal prefill expects lq <= lk (the queries are the last lq of the lk "
                   f"tokens)")
    if block_table is not None:
        check_paged_lengths("key lengths (cu_seqlens_k diffs)", lk, block_table, k.shape[0],
                            k.shape[1])


def check_decode_data(k_cache, seqlens_k, block_table) -> None:
    check_paged_lengths("seqlens_k", seqlens_k, block_table, k_cache.shape[0], k_cache.shape[1])
