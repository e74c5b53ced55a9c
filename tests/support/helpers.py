"""Test helpers: random batches, an independent float64 oracle, and a verbose allclose.

The float64 loop here is deliberately the plainest possible reading of the contract (a loop over
sequences, heads and query rows), independent of the vectorised reference backend it checks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# (dtype, atol, rtol) for comparing a backend against the reference.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                 what: str = "output") -> None:
    """allclose that rejects NaN (on either side), requires an infinity exactly where one is
    expected (with its sign: a tolerance scaled by an infinite expectation would accept
    anything), and reports the first mismatching indices."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.double(), expected.double()
    assert not torch.isnan(a).any(), f"{what}: NaN at {torch.isnan(a).nonzero()[:5].tolist()}"
    assert not torch.isnan(e).any(), (f"{what}: NaN expected at "
                                      f"{torch.isnan(e).nonzero()[:5].tolist()} (compare those "
                                      "rows by their pattern, the rest by value)")
    infinite = torch.isinf(e)
    bad = torch.where(infinite, a != e, (a - e).abs() > atol + rtol * e.abs())
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        pairs = [(i, a[tuple(i)].item(), e[tuple(i)].item()) for i in idx]
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} elements differ; "
                             f"max abs err {(a - e).abs().max().item():.3g}; first (index, "
                             f"actual, expected): {pairs}")


def write_stand_ins(directory, names) -> str:
    """An empty importable module per name in ``directory`` (returned, as a path entry): with
    these first on the path, an import a test says never happens shows in ``sys.modules``
    instead of failing quietly where the package is not installed (CI installs neither torch_npu
    nor torchair, so a guarded ``try: import torch_npu`` would look like no import at all)."""
    for name in names:
        (Path(directory) / f"{name}.py").write_text('"""An importable stand-in."""\n')
    return str(directory)


@contextlib.contextmanager
def importable_stand_ins(monkeypatch, directory, *names):
    """Inside the block, ``names`` are importable (:func:`write_stand_ins`, first on
    ``sys.path``); any of them imported there is dropped from ``sys.modules`` after it."""
    monkeypatch.syspath_prepend(write_stand_ins(directory, names))
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)


def loaded_in_a_fresh_interpreter(imports: list[str], watched: tuple[str, ...],
                                  stubs_dir) -> list[str]:
    """The modules of the ``watched`` packages that importing ``imports`` loads in a fresh
    interpreter where each watched package is importable (:func:`write_stand_ins` in
    ``stubs_dir``, first on the path)."""
    root = str(Path(__file__).parents[2])
    code = (f"import json, sys\nimport {', '.join(imports)}\nprint(json.dumps(sorted(m for m in "
            f"sys.modules if m.split('.')[0] in {tuple(watched)!r})))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([write_stand_ins(stubs_dir, watched), root]))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def fp8_meaning(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What FP8 rows ``[..., Hkv, D]`` stored with ``scale`` (``[]`` or ``[Hkv]``) mean, in
    float64: each byte's value times its head's scale (the contract's read rule), written out
    here rather than taken from the library."""
    return x8.double() * scale.double().reshape(-1, 1)


def cu_seqlens(lens: list[int], device="cpu") -> torch.Tensor:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


@dataclass
class PagedBatch:
    """A random paged cache holding ``lens_k[b]`` tokens of each sequence in shuffled blocks."""
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    k_dense: list  # per sequence [lk, Hkv, D] (what the cache holds, in token order)
    v_dense: list


def random_paged(lens_k: list[int], hkv: int, d: int, block_size: int, dtype, device="cpu",
                 spare_blocks: int = 3, table_width: int | None = None) -> PagedBatch:
    """Caches ``[num_blocks, block_size, hkv, d]`` with each sequence's tokens in random blocks.

    Unused block-table entries are filled with garbage (-7 and huge ids) that must be ignored.
    """
    need = [-(-n // block_size) for n in lens_k]
    width = table_width or max(need + [1])
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks).tolist()
    k_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=device)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=device)
    table = torch.full((len(lens_k), width), -7, dtype=torch.int32)
    table[:, width // 2:] = 10 ** 6
    k_dense, v_dense = [], []
    for b, n in enumerate(lens_k):
        blocks = [perm.pop() for _ in range(need[b])]
        table[b, :need[b]] = torch.tensor(blocks, dtype=torch.int32)
        slots = [blocks[p // block_size] * block_size + p % block_size for p in range(n)]
        idx = torch.tensor(slots, dtype=torch.int64, device=device)
        k_dense.append(k_cache.view(-1, hkv, d)[idx].clone())
        v_dense.append(v_cache.view(-1, hkv, d)[idx].clone())
    return PagedBatch(k_cache, v_cache, table.to(device), k_dense, v_dense)


def attention_f64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                  window_left: int = -1, softcap: float = 0.0, sinks=None,
                  return_lse: bool = False):
    """One sequence, float64, loops: q ``[lq, H, D]``, k/v ``[lk, Hkv, D]`` -> ``[lq, H, D]``.

    ``sinks`` ``[H]`` (or None) adds ``exp(sinks[h])`` to each row's denominator. With
    ``return_lse`` also returns lse ``[lq, H]``: log of the denominator, -inf for a row with no key.
    """
    lq, h, d = q.shape
    lk, hkv = k.shape[0], k.shape[1]
    out = torch.zeros(lq, h, d, dtype=torch.float64)
    lse = torch.full((lq, h), float("-inf"), dtype=torch.float64)
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    for head in range(h):
        kvh = head // (h // hkv)
        for i in range(lq):
            keys = []
            for j in range(lk):
                if causal and j > i + lk - lq:
                    continue
                if window_left >= 0 and j < i + lk - lq - window_left:
                    continue
                keys.append(j)
            if not keys:
                continue
            s = [float(q[i, head] @ k[j, kvh]) * scale for j in keys]
            if softcap > 0:
                s = [softcap * math.tanh(x / softcap) for x in s]
            m = max(s)
            w = [math.exp(x - m) for x in s]
            z = sum(w)
            if sinks is not None:
                z += math.exp(float(sinks[head]) - m)
            lse[i, head] = m + math.log(z)
            for wj, j in zip(w, keys):
                out[i, head] += (wj / z) * v[j, kvh]
    return (out, lse) if return_lse else out


def prefill_f64(q, k, v, lens_q, lens_k, scale, causal, window_left=-1, softcap=0.0, sinks=None,
                return_lse=False):
    """Varlen float64 oracle over dense packed q ``[Tq, H, D]`` and k/v ``[Tk, Hkv, D]``.

    Rows past ``sum(lens_q)`` are zero (lse -inf); with ``return_lse``, returns ``(out, lse)``.
    """
    outs, lses, oq, ok = [], [], 0, 0
    for lq, lk in zip(lens_q, lens_k):
        o, lse = attention_f64(q[oq:oq + lq], k[ok:ok + lk], v[ok:ok + lk], scale, causal,
                               window_left, softcap, sinks, return_lse=True)
        outs.append(o)
        lses.append(lse)
        oq, ok = oq + lq, ok + lk
    h, d = q.shape[1], q.shape[2]
    rest = q.shape[0] - oq
    outs.append(torch.zeros(rest, h, d, dtype=torch.float64))
    lses.append(torch.full((rest, h), float("-inf"), dtype=torch.float64))
    out, lse = torch.cat(outs), torch.cat(lses)
    return (out, lse) if return_lse else out


def poisoned(shape, dtype, device="cpu") -> torch.Tensor:
    """A NaN-filled tensor: an output buffer whose unwritten elements a test must notice."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def record_launches(monkeypatch, module, key: str) -> list:
    """Patch ``module.launch`` (a kernel module's launch helper) to note the launch parameter
    ``key`` of every launch, in order, then launch as usual; returns the list it fills."""
    seen = []
    launch = module.launch

    def record(kernel, grid, *args, **kwargs):
        seen.append(kwargs.get(key))
        return launch(kernel, grid, *args, **kwargs)
    monkeypatch.setattr(module, "launch", record)
    return seen


def laid_apart(cache: torch.Tensor) -> torch.Tensor:
    """A copy of a paged cache ``[blocks, page, Hkv, D]`` whose block and in-page strides both
    differ from a packed cache's: its pages along a transposed ``[page, blocks, Hkv, D]`` buffer
    (a V cache that cannot share K's offsets: the kernels' ``KV_SAME_STRIDES``)."""
    buffer = torch.empty(cache.shape[1], cache.shape[0], *cache.shape[2:], dtype=cache.dtype,
                         device=cache.device)
    apart = buffer.transpose(0, 1)
    apart.copy_(cache)
    assert apart.stride()[:2] != cache.stride()[:2] or cache.shape[0] == 1
    return apart
