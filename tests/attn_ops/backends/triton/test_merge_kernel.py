"""merge_states' Triton kernel (merge_kernel.py) against the reference: the interpreter at tiny
shapes, and, marked ``cuda``, compiled on a GPU."""

from __future__ import annotations

import pytest
import torch

import attn_ops
from attn_ops.backends import reference
from tests.support.helpers import TOLERANCES, assert_close

triton = pytest.importorskip("triton")
from attn_ops.backends.triton import merge_kernel  # noqa: E402  (imports triton)

INF = float("inf")


def _parts(n, h, d, dtype, device="cpu"):
    """Two parts with every lse case: finite, one side -inf (NaN in its unread output), both."""
    out_a = torch.randn(n, h, d, dtype=dtype, device=device)
    out_b = torch.randn(n, h, d, dtype=dtype, device=device)
    lse_a = torch.randn(n, h, device=device) * 4
    lse_b = torch.randn(n, h, device=device) * 4
    if n >= 3:
        lse_a[0], lse_b[1] = -INF, -INF
        lse_a[2, 0] = lse_b[2, 0] = -INF
        out_a[0] = float("nan")
        out_b[1] = float("nan")
    return out_a, lse_a, out_b, lse_b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,h,d", [(13, 3, 40), (5, 1, 8), (0, 2, 16)])
def test_merge_states_matches_reference(dtype, n, h, d):
    args = _parts(n, h, d, dtype)
    out, lse = attn_ops.merge_states(*args, backend="triton")
    want, want_lse = reference.merge_states(*args)
    atol, rtol = TOLERANCES[dtype]
    assert_close(out, want, atol, rtol)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    assert_close(lse, want_lse, 1e-6, 1e-6, "lse")


def test_merge_states_strided_views_and_nan_lse():
    """Parts as head slices of wider tensors (no copy); a NaN lse makes its row NaN."""
    wide_out = torch.randn(7, 6, 16)
    wide_lse = torch.randn(7, 6)
    wide_lse[3, 1] = float("nan")
    args = (wide_out[:, :3], wide_lse[:, :3], wide_out[:, 3:], wide_lse[:, 3:])
    assert not args[0].is_contiguous()
    out, lse = merge_kernel.merge_states(*args)
    want, want_lse = reference.merge_states(*args)
    assert torch.isnan(lse[3, 1]) and torch.isnan(out[3, 1]).all()
    keep = torch.ones(7, 3, dtype=torch.bool)
    keep[3, 1] = False
    assert_close(out[keep], want[keep], 1e-6, 1e-6)
    assert_close(lse[keep], want_lse[keep], 1e-6, 1e-6)


@pytest.mark.parametrize("n,h,d,dtype", [(4096, 32, 128, torch.bfloat16), (123, 8, 64, torch.float16),
                                         (77, 5, 256, torch.float32)])
@pytest.mark.cuda
def test_merge_states_cuda(n, h, d, dtype):
    args = _parts(n, h, d, dtype, "cuda")
    out, lse = merge_kernel.merge_states(*args)
    want, want_lse = reference.merge_states(*args)
    atol, rtol = TOLERANCES[dtype]
    assert_close(out, want, atol, rtol)
    assert_close(lse, want_lse, 1e-5, 1e-5, "lse")
