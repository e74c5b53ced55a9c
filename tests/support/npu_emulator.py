"""A CPU emulator of the torch_npu ops the npu backend calls. TEST-ONLY, never shipped.

No machine of this project has an Ascend NPU or CANN, so torch_npu cannot be imported. This
module registers CPU kernels (and fake kernels) under the real names, ``torch.ops.npu.*`` and
``torch.ops.atb.*``, with the real schemas, ONLY when those ops are absent from the process (it
never shadows a real torch_npu). The kernels follow the semantics that torch_npu 2.13's own docs
and meta kernels give (the project's NPU spec), and they are strict where the docs are: a lowering
that gets a documented rule wrong fails here loudly instead of on hardware. In particular:

* FIA v2: TND ``actual_seq_qlen`` is cumulative and must end at T; ``actual_seq_kvlen`` is
  cumulative without a block table and per-request with one; ``softmax_scale`` defaults to 1.0;
  sparse_mode 2/3/4 need the compressed ``(2048, 2048)`` mask with 1 = masked and nothing else;
  a 4-D paged cache is read as ``(nb, Hkv, bs, D)`` (so an unviewed ``(nb, bs, Hkv, D)`` cache gives
  wrong numbers, as on hardware); query length 1 in BNSD ignores sparse_mode; GQA head h reads kv
  head ``h // (N / Nkv)``; LSE is fp32. TND is accepted for bf16 with head dim 128/192 only.
* Behaviour the docs leave open is poisoned: a query row that sees no key comes out NaN (output
  and softmax_lse), so the backend must not depend on it.
* Scatter ops: slots must lie in ``[0, nb * bs)`` (the documented range); a repeated slot is
  accepted only when every row written there is identical; ``npu_scatter_pa_kv_cache`` accepts
  only ``cache_mode='Norm'`` for these ND caches (its default, 'PA_NZ', means another layout).

Every kernel call is appended to :data:`CALLS` (op name and the actual arguments) so that tests can
check the lowering call by call; use :func:`recording`.
"""

from __future__ import annotations

import contextlib
import functools

import torch

CALLS: list[dict] = []
_LIBS: list[torch.library.Library] = []

FIA_V2_SCHEMA = (
    "npu_fused_infer_attention_score_v2(Tensor query, Tensor key, Tensor value, *, "
    "Tensor? query_rope=None, Tensor? key_rope=None, Tensor? pse_shift=None, "
    "Tensor? atten_mask=None, SymInt[]? actual_seq_qlen=None, SymInt[]? actual_seq_kvlen=None, "
    "Tensor? block_table=None, Tensor? dequant_scale_query=None, Tensor? dequant_scale_key=None, "
    "Tensor? dequant_offset_key=None, Tensor? dequant_scale_value=None, "
    "Tensor? dequant_offset_value=None, Tensor? dequant_scale_key_rope=None, "
    "Tensor? quant_scale_out=None, Tensor? quant_offset_out=None, Tensor? quant_scale_p=None, "
    "Tensor? learnable_sink=None, int num_query_heads=1, int num_key_value_heads=0, "
    "float softmax_scale=1.0, int pre_tokens=2147483647, int next_tokens=2147483647, "
    "str input_layout=\"BSH\", int sparse_mode=0, int block_size=0, int query_quant_mode=0, "
    "int key_quant_mode=0, int value_quant_mode=0, int inner_precise=0, "
    "bool return_softmax_lse=False, int? query_dtype=None, int? key_dtype=None, "
    "int? value_dtype=None, int? query_rope_dtype=None, int? key_rope_dtype=None, "
    "int? key_shared_prefix_dtype=None, int? value_shared_prefix_dtype=None, "
    "int? dequant_scale_query_dtype=None, int? dequant_scale_key_dtype=None, "
    "int? dequant_scale_value_dtype=None, int? dequant_scale_key_rope_dtype=None, "
    "int? out_dtype=None) -> (Tensor, Tensor)")
SCATTER_PA_SCHEMA = (
    "npu_scatter_pa_kv_cache(Tensor key, Tensor value, Tensor(a!) key_cache, "
    "Tensor(b!) value_cache, Tensor slot_mapping, *, Tensor? compress_lens=None, "
    "Tensor? compress_seq_offsets=None, Tensor? seq_lens=None, str? cache_mode='PA_NZ') -> ()")
RESHAPE_AND_CACHE_SCHEMA = (
    "_npu_reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, "
    "Tensor(b!) value_cache, Tensor slot_indices) -> ()")
SCATTER_ND_SCHEMA = "npu_scatter_nd_update_(Tensor(a!) self, Tensor indices, Tensor updates) -> Tensor(a!)"

MASK_SIZE = 2048
_USED_FIA_KWARGS = {"atten_mask", "actual_seq_qlen", "actual_seq_kvlen", "block_table",
                    "num_query_heads", "num_key_value_heads", "softmax_scale", "pre_tokens",
                    "next_tokens", "input_layout", "sparse_mode", "block_size",
                    "return_softmax_lse", "inner_precise"}


class EmulatorError(ValueError):
    """A call that torch_npu's docs say is invalid (the real op would reject or misbehave)."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise EmulatorError("emulated torch_npu: " + msg)


@contextlib.contextmanager
def recording():
    """Collect the emulated kernel calls made inside the block; yields the list."""
    CALLS.clear()
    yield CALLS


def is_emulated() -> bool:
    """True when the ops in torch.ops.npu are this emulator's (torch_npu is not loaded)."""
    return bool(_LIBS)


def install() -> bool:
    """Register the emulated ops unless real ones exist. Returns :func:`is_emulated`."""
    if _LIBS:
        return True
    try:
        getattr(torch.ops.npu, "npu_fused_infer_attention_score_v2")
        return False  # a real torch_npu is loaded: never shadow it
    except (AttributeError, RuntimeError):
        pass
    npu = torch.library.Library("npu", "FRAGMENT")
    atb = torch.library.Library("atb", "FRAGMENT")
    _LIBS.extend([npu, atb])
    for lib, schema, kernel, fake in (
            (npu, FIA_V2_SCHEMA, _fia_v2, _fia_v2_fake),
            (npu, SCATTER_PA_SCHEMA, _scatter_pa_kv_cache, _no_output_fake),
            (atb, RESHAPE_AND_CACHE_SCHEMA, _reshape_and_cache, _no_output_fake),
            (npu, SCATTER_ND_SCHEMA, _scatter_nd_update_, _scatter_nd_update_fake)):
        op_name = lib.define(schema)
        lib.impl(op_name, kernel, "CPU")
        torch.library.register_fake(f"{lib.ns}::{op_name}", fake, lib=lib)
    return True


# ---------------------------------------------------------------------------------------------
# FIA v2
# ---------------------------------------------------------------------------------------------

def _fia_v2(query, key, value, **kw):
    CALLS.append(dict(op="npu_fused_infer_attention_score_v2", query=query, key=key, value=value,
                      kwargs=dict(kw)))
    unused = {k: v for k, v in kw.items() if k not in _USED_FIA_KWARGS and v is not None
              and not (k.endswith("_mode") and v == 0)}
    _require(not unused, f"FIA v2 options outside this emulator: {sorted(unused)}")
    layout = kw.get("input_layout", "BSH")
    n = kw.get("num_query_heads", 1)
    nkv = kw.get("num_key_value_heads", 0) or n
    scale = kw.get("softmax_scale", 1.0)
    _require(query.dtype in (torch.float16, torch.bfloat16),
             f"query dtype must be float16/bfloat16, got {query.dtype}")
    _require(key.dtype == query.dtype and value.dtype == query.dtype, "q/k/v dtypes differ")
    _require(n % nkv == 0 and n // nkv <= 64,
             f"num_query_heads {n} / num_key_value_heads {nkv} must be an integer <= 64")
    d = query.shape[-1]
    _require(d % 16 == 0 and d <= 512, f"head dim must be 16-aligned and <= 512, got {d}")
    if layout == "TND":
        _require(query.dim() == 3 and query.shape[1] == n,
                 f"TND query must be (T, {n}, D), got {tuple(query.shape)}")
        _require(query.dtype == torch.bfloat16 and d in (128, 192),
                 "TND without rope is documented for bfloat16 with head dim 128/192 only")
        q_rows = _tnd_rows(kw.get("actual_seq_qlen"), query.shape[0], "actual_seq_qlen")
        queries = [query[a:b] for a, b in q_rows]
        incremental = False
    elif layout == "BNSD":
        _require(query.dim() == 4 and query.shape[1] == n,
                 f"BNSD query must be (B, {n}, S, D), got {tuple(query.shape)}")
        s = query.shape[2]
        lens = _per_batch(kw.get("actual_seq_qlen"), query.shape[0], s, "actual_seq_qlen")
        queries = [query[b, :, :lens[b]].transpose(0, 1) for b in range(query.shape[0])]
        incremental = s == 1
    else:
        raise EmulatorError(f"emulated torch_npu: input_layout {layout!r} is not emulated")
    keys, values = _fia_keys(key, value, kw, layout, len(queries), nkv, d, incremental)
    mode = kw.get("sparse_mode", 0)
    if not incremental:
        _check_mask(mode, kw.get("atten_mask"))
    outs, lses = [], []
    for qb, kb, vb in zip(queries, keys, values):
        allowed = _allowed(qb.shape[0], kb.shape[0], 0 if incremental else mode,
                           kw.get("pre_tokens", 2147483647), kw.get("next_tokens", 2147483647))
        o, lse = _attend(qb, kb, vb, scale, allowed)
        outs.append(o.to(query.dtype))
        lses.append(lse)
    if layout == "TND":
        out, lse = torch.cat(outs), torch.cat(lses)[:, :, None]
    else:
        out = torch.full_like(query, float("nan"))
        lse = torch.full(query.shape[:3] + (1,), float("nan"))
        for b, (o, l_) in enumerate(zip(outs, lses)):
            out[b, :, :o.shape[0]] = o.transpose(0, 1)
            lse[b, :, :o.shape[0], 0] = l_.transpose(0, 1)
    if not kw.get("return_softmax_lse", False):
        lse = torch.empty(0, dtype=torch.float32)
    return out, lse


def _fia_v2_fake(query, key, value, **kw):
    if kw.get("return_softmax_lse", False):
        lse_shape = query.shape[:2] + (1,) if kw.get("input_layout") == "TND" else \
            query.shape[:3] + (1,)
        lse = query.new_empty(lse_shape, dtype=torch.float32)
    else:
        lse = query.new_empty((0,), dtype=torch.float32)
    return query.new_empty(query.shape), lse


def _tnd_rows(cum, total: int, name: str) -> list[tuple[int, int]]:
    _require(cum is not None and len(cum) >= 1, f"{name} is required for TND")
    _require(all(b >= a for a, b in zip([0] + list(cum), cum)),
             f"{name} must be cumulative (non-decreasing), got {list(cum)}")
    _require(cum[-1] == total, f"{name} is cumulative and must end at the token count {total}, "
                               f"got {list(cum)}")
    return list(zip([0] + list(cum[:-1]), cum))


def _per_batch(lens, batch: int, full: int, name: str) -> list[int]:
    if lens is None:
        return [full] * batch
    _require(len(lens) == batch, f"{name} must have {batch} per-batch entries, got {list(lens)}")
    _require(all(0 <= n <= full for n in lens), f"{name} entries must be in [0, {full}]")
    return list(lens)


def _fia_keys(key, value, kw, layout, batch, nkv, d, incremental):
    """Per-request ``[Skv, Nkv, D]`` keys and values."""
    table = kw.get("block_table")
    kv_lens = kw.get("actual_seq_kvlen")
    if table is None:
        if layout == "TND":
            rows = _tnd_rows(kv_lens, key.shape[0], "actual_seq_kvlen (no block_table)")
            _require(len(rows) == batch, "actual_seq_qlen and actual_seq_kvlen lengths differ")
            return [key[a:b] for a, b in rows], [value[a:b] for a, b in rows]
        lens = _per_batch(kv_lens, batch, key.shape[2], "actual_seq_kvlen")
        return ([key[b, :, :lens[b]].transpose(0, 1) for b in range(batch)],
                [value[b, :, :lens[b]].transpose(0, 1) for b in range(batch)])
    bs = kw.get("block_size", 0)
    _require(table.dtype == torch.int32 and table.dim() == 2 and table.shape[0] == batch,
             f"block_table must be int32 (B={batch}, max_blocks), got {table.dtype} "
             f"{tuple(table.shape)}")
    if incremental:
        _require(bs > 0 and bs % 16 == 0 and bs <= 512, f"block_size {bs}: decode needs a "
                                                          f"multiple of 16 up to 512")
    else:
        _require(bs in (128, 256, 384, 512), f"block_size {bs}: paged prefill needs a multiple "
                                              f"of 128 in [128, 512]")
    _require(kv_lens is not None and len(kv_lens) == batch,
             f"with block_table, actual_seq_kvlen holds the {batch} per-request lengths")
    if key.dim() == 3:  # (nb, bs, Nkv*D)
        _require(key.shape[1] == bs and key.shape[2] == nkv * d,
                 f"3-D paged cache must be (nb, {bs}, {nkv * d}), got {tuple(key.shape)}")
        as_tokens = lambda c, blocks: c[blocks].reshape(-1, nkv, d)  # noqa: E731
    else:  # 4-D is read as (nb, Nkv, bs, D)
        _require(key.dim() == 4 and key.shape[1] == nkv and key.shape[2] == bs,
                 f"4-D paged cache is read as (nb, {nkv}, {bs}, {d}), got {tuple(key.shape)}")
        as_tokens = lambda c, blocks: c[blocks].permute(0, 2, 1, 3).reshape(-1, nkv, d)  # noqa
    keys, values = [], []
    for b, n in enumerate(kv_lens):
        need = -(-n // bs)
        _require(0 <= n <= table.shape[1] * bs, f"actual_seq_kvlen[{b}] = {n} exceeds the "
                                                f"block table row ({table.shape[1]} blocks)")
        blocks = table[b, :need].long()
        _require(bool(((blocks >= 0) & (blocks < key.shape[0])).all()),
                 f"block_table[{b}] has ids outside [0, {key.shape[0]}) in its first {need} "
                 f"entries")
        keys.append(as_tokens(key, blocks)[:n])
        values.append(as_tokens(value, blocks)[:n])
    return keys, values


def _check_mask(mode: int, mask) -> None:
    _require(mode in (0, 2, 3, 4), f"sparse_mode {mode} is not emulated")
    if mode == 0:
        _require(mask is None, "sparse_mode 0 with a full atten_mask is not emulated")
        return
    _require(mask is not None, f"sparse_mode {mode} needs the compressed atten_mask")
    _require(mask.dtype in (torch.bool, torch.int8, torch.uint8),
             f"atten_mask must be bool/int8/uint8, got {mask.dtype}")
    _require(tuple(mask.shape[-2:]) == (MASK_SIZE, MASK_SIZE) and mask.numel() == MASK_SIZE ** 2,
             f"sparse_mode {mode} takes the compressed ({MASK_SIZE}, {MASK_SIZE}) mask, got "
             f"{tuple(mask.shape)}")
    _require(torch.equal(mask.reshape(MASK_SIZE, MASK_SIZE).bool(), _expected_mask()),
             "the compressed mask must be triu(ones(2048, 2048), 1): 1 = masked out")


@functools.lru_cache(maxsize=1)
def _expected_mask() -> torch.Tensor:
    return torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool).triu(1)


def _allowed(sq: int, skv: int, mode: int, pre: int, nxt: int) -> torch.Tensor:
    i = torch.arange(sq)[:, None]
    j = torch.arange(skv)[None, :]
    if mode == 0:
        return torch.ones(sq, skv, dtype=torch.bool)
    if mode == 2:
        return j <= i
    diag = i + skv - sq  # bottom-right alignment, per request
    if mode == 3:
        return j <= diag
    return (j >= diag - pre) & (j <= diag + nxt)


def _attend(q, k, v, scale, allowed):
    """q ``[Sq, N, D]``, k/v ``[Skv, Nkv, D]``; fp32 math. Rows with no allowed key are NaN."""
    g = q.shape[1] // k.shape[1]
    kk = k.float().repeat_interleave(g, dim=1)
    vv = v.float().repeat_interleave(g, dim=1)
    s = torch.einsum("qnd,knd->nqk", q.float(), kk) * scale
    s = s.masked_fill(~allowed[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [N, Sq]
    p = torch.softmax(s, dim=-1)
    out = torch.einsum("nqk,knd->qnd", p, vv)
    blind = ~allowed.any(dim=-1)
    out[blind] = float("nan")  # a row that sees no key: undocumented, poisoned (its LSE too)
    lse[:, blind] = float("nan")
    return out, lse.transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# Cache scatter ops
# ---------------------------------------------------------------------------------------------

def _scatter_rows(flat: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, what: str) -> None:
    """``flat[index[t]] = rows[t]``; a repeated index must carry identical rows."""
    _require(bool(((index >= 0) & (index < flat.shape[0])).all()),
             f"{what}: every slot must be in [0, {flat.shape[0]}), got {index.tolist()}")
    for slot in index.unique():
        same = rows[index == slot]
        _require(bool((same == same[0]).all()),
                 f"{what}: slot {int(slot)} is written by rows with different data")
    flat[index] = rows


def _scatter_pa_kv_cache(key, value, key_cache, value_cache, slot_mapping, *, compress_lens=None,
                         compress_seq_offsets=None, seq_lens=None, cache_mode="PA_NZ"):
    CALLS.append(dict(op="npu_scatter_pa_kv_cache", key=key, value=value, key_cache=key_cache,
                      value_cache=value_cache, slot_mapping=slot_mapping,
                      kwargs=dict(cache_mode=cache_mode)))
    _require(cache_mode in (None, "Norm"),
             f"cache_mode {cache_mode!r}: 'PA_NZ' (the default) writes the FRACTAL_NZ layout; "
             f"ND caches (nb, bs, N, D) need cache_mode='Norm'")
    _require(compress_lens is None and compress_seq_offsets is None and seq_lens is None,
             "compressed scatter scenarios are not emulated")
    _nd_cache_store(key, value, key_cache, value_cache, slot_mapping, "npu_scatter_pa_kv_cache")


def _reshape_and_cache(key, value, key_cache, value_cache, slot_indices):
    CALLS.append(dict(op="_npu_reshape_and_cache", key=key, value=value, key_cache=key_cache,
                      value_cache=value_cache, slot_mapping=slot_indices, kwargs={}))
    _require(slot_indices.dtype == torch.int32, "slot_indices must be int32")
    _nd_cache_store(key, value, key_cache, value_cache, slot_indices, "_npu_reshape_and_cache")


def _nd_cache_store(key, value, key_cache, value_cache, slots, what):
    _require(key.dim() == 3 and key_cache.dim() == 4 and key.shape[1:] == key_cache.shape[2:],
             f"{what}: key (T, N, D) and cache (nb, bs, N, D) expected, got "
             f"{tuple(key.shape)} / {tuple(key_cache.shape)}")
    _require(key.dtype == key_cache.dtype and value.dtype == value_cache.dtype,
             f"{what}: dtypes differ")
    _require(slots.dtype in (torch.int32, torch.int64), f"{what}: slots must be int32/int64")
    index = slots.long()
    _scatter_rows(key_cache.view(-1, *key_cache.shape[2:]), index, key, what + " (key)")
    _scatter_rows(value_cache.view(-1, *value_cache.shape[2:]), index, value, what + " (value)")


def _scatter_nd_update_(self, indices, updates):
    CALLS.append(dict(op="npu_scatter_nd_update_", self=self, indices=indices, updates=updates,
                      kwargs={}))
    _require(indices.dim() == 2 and indices.shape[1] <= self.dim(),
             f"indices must be (T, k<=rank), got {tuple(indices.shape)}")
    k = indices.shape[1]
    _require(updates.shape == indices.shape[:1] + self.shape[k:],
             f"updates must be {tuple(indices.shape[:1] + self.shape[k:])}, got "
             f"{tuple(updates.shape)}")
    for dim in range(k):
        _require(bool(((indices[:, dim] >= 0) & (indices[:, dim] < self.shape[dim])).all()),
                 f"indices[:, {dim}] outside [0, {self.shape[dim]})")
    flat_index = torch.zeros(indices.shape[0], dtype=torch.int64)
    for dim in range(k):
        flat_index = flat_index * self.shape[dim] + indices[:, dim].long()
    _scatter_rows(self.view(-1, *self.shape[k:]), flat_index, updates, "npu_scatter_nd_update_")
    return self


def _no_output_fake(*args, **kwargs):
    return None


def _scatter_nd_update_fake(self, indices, updates):
    return self
