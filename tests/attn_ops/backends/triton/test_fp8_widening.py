"""How the decode's key walk widens an FP8 cache read as int16 (fp8_widening.py): the K tile
in halves of four bytes (``fp8_key_halves``, with q split alike by ``key_half_rows``), the V
tile in even and odd columns (``fp8_pairs``). Checked element by element against the bytes as
torch reads them, and as the dot products the walk takes from them: in the interpreter (the
kernels' plain Triton form) and, marked ``cuda``, compiled with the inline conversions, which
must agree with the plain form bit for bit."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from attn_ops.backends.triton.fp8_widening import (  # noqa: E402
    fp8_key_halves, fp8_pairs, key_half_rows)

ROWS, J = 16, 32  # int16 elements per row: 64 FP8 bytes (a head dim of 64)


@triton.jit
def _widen_kernel(X, Q, A, B, EVEN, ODD, QA, QB, DOTS, ROWS: tl.constexpr, J: tl.constexpr,
                  ASM: tl.constexpr):
    r = tl.arange(0, ROWS)
    j = tl.arange(0, J)
    d = tl.arange(0, 2 * J)
    half = r[:, None] * J + j[None, :]
    x = tl.load(X + half)
    a, b = fp8_key_halves(x, ASM)
    even, odd = fp8_pairs(x, ASM)
    q = tl.load(Q + r[:, None] * (2 * J) + d[None, :])
    qa, qb = key_half_rows(q, ROWS, 2 * J)
    tl.store(A + half, a)
    tl.store(B + half, b)
    tl.store(EVEN + half, even)
    tl.store(ODD + half, odd)
    tl.store(QA + half, qa)
    tl.store(QB + half, qb)
    tl.store(DOTS + r, tl.sum(qa.to(tl.float32) * a.to(tl.float32), 1)
             + tl.sum(qb.to(tl.float32) * b.to(tl.float32), 1))


def _widen(x: torch.Tensor, q: torch.Tensor, asm: bool) -> dict:
    out = {name: torch.full((ROWS, J), float("nan"), dtype=torch.float16, device=x.device)
           for name in ("a", "b", "even", "odd", "qa", "qb")}
    dots = torch.full((ROWS,), float("nan"), dtype=torch.float32, device=x.device)
    _widen_kernel[(1,)](x, q, out["a"], out["b"], out["even"], out["odd"], out["qa"],
                        out["qb"], dots, ROWS, J, asm)
    return dict(out, dots=dots)


def _inputs(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x int16 [ROWS, J], its bytes widened by torch fp16 [ROWS, 2J], q fp16 [ROWS, 2J]):
    random FP8 bytes, NaN encodings (0x7f, 0xff) left out: they would compare unequal."""
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (ROWS, 2 * J), generator=gen, dtype=torch.int32)
    raw = torch.where((raw & 0x7F) == 0x7F, raw - 1, raw).to(torch.uint8)
    full = raw.view(torch.float8_e4m3fn).to(torch.float16)  # column c is byte c
    q = torch.randn(ROWS, 2 * J, generator=gen).to(torch.float16)
    x = raw.view(torch.int16)  # little-endian: element m holds bytes 2m (low) and 2m + 1
    return x.to(device), full.to(device), q.to(device)


def _check(got: dict, full: torch.Tensor, q: torch.Tensor):
    cols = torch.arange(2 * J, device=full.device)
    a_cols, b_cols = cols[cols % 4 < 2], cols[cols % 4 >= 2]
    assert torch.equal(got["a"], full[:, a_cols])
    assert torch.equal(got["b"], full[:, b_cols])
    assert torch.equal(got["qa"], q[:, a_cols])
    assert torch.equal(got["qb"], q[:, b_cols])
    assert torch.equal(got["even"], full[:, 0::2])
    assert torch.equal(got["odd"], full[:, 1::2])
    ref = (q.double() * full.double()).sum(1)
    torch.testing.assert_close(got["dots"].double(), ref, rtol=1e-5, atol=1e-3)


def test_key_halves_and_pairs():
    # the plain form (what the interpreter and a GPU without the inline conversions run)
    x, full, q = _inputs("cpu")
    _check(_widen(x, q, asm=False), full, q)


@pytest.mark.cuda
def test_key_halves_and_pairs_cuda():
    # the inline conversions compiled (cvt.rn.f16x2.e4m3x2, the pairs' byte permute): each
    # element as the plain form gives it
    x, full, q = _inputs("cuda")
    asm, plain = _widen(x, q, asm=True), _widen(x, q, asm=False)
    for name in ("a", "b", "even", "odd", "qa", "qb"):
        assert torch.equal(asm[name], plain[name]), name
    _check(asm, full, q)
