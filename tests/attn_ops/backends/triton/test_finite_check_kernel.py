"""The finite check (finite_check_kernel.py) and the gate it drives in the prefill kernel: the
interpreter at tiny shapes (CI); the Hopper route that uses both is tested on the GPU in
test_hopper_prefill_kernel.py."""

from __future__ import annotations

import math

import pytest
import torch

from attn_ops.backends import reference
from tests.support.helpers import TOLERANCES, assert_close, cu_seqlens, poisoned

pytest.importorskip("triton")
from attn_ops.backends.triton import finite_check_kernel, prefill_kernel  # noqa: E402

BF16 = torch.bfloat16


def _values(tokens=123, hkv=3, d=40, strided=True):
    """Never-zero values; ``strided``: a [T, Hkv, D] view of a wider buffer (token stride
    (Hkv + 2) * D, head stride D), which the scan must read through its strides."""
    if strided:
        base = torch.rand(tokens, hkv + 2, d, dtype=BF16) + 0.5
        return base[:, 1:hkv + 1]
    return torch.rand(tokens, hkv, d, dtype=BF16) + 0.5


def test_finite_values_give_zero_parts_and_every_part_is_written():
    v = _values()
    parts = torch.full((finite_check_kernel.parts_count(v.device),), -7, dtype=torch.int32)
    assert finite_check_kernel.nonfinite_parts(v, parts) is parts
    assert torch.equal(parts, torch.zeros_like(parts))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("token, head, dim", [(0, 0, 0), (122, 2, 39), (57, 1, 13)])
def test_one_non_finite_element_marks_a_part(value, token, head, dim):
    v = _values()
    v[token, head, dim] = value
    parts = finite_check_kernel.nonfinite_parts(v)
    assert int(parts.sum()) == 1 and set(parts.tolist()) <= {0, 1}


def test_a_non_finite_element_outside_the_view_is_not_seen():
    base = torch.rand(50, 4, 16, dtype=BF16) + 0.5
    base[:, 0] = math.nan  # the head the view leaves out
    parts = finite_check_kernel.nonfinite_parts(base[:, 1:])
    assert int(parts.sum()) == 0


@pytest.mark.parametrize("dirty", [False, True])
def test_the_gate_runs_the_prefill_kernel_only_when_a_part_is_set(dirty):
    lens = [13, 0, 30]
    q = torch.randn(sum(lens) + 3, 4, 32, dtype=BF16)
    k = torch.randn(sum(lens), 2, 32, dtype=BF16)
    v = torch.randn_like(k)
    cu = cu_seqlens(lens)
    parts = torch.zeros(finite_check_kernel.parts_count(q.device), dtype=torch.int32)
    parts[-1] = int(dirty)
    out = poisoned(q.shape, BF16, "cpu")
    prefill_kernel.prefill(q, k, v, cu, cu, 30, 30, 0.2, True, out=out, gate=parts)
    if dirty:
        ref = reference.prefill(q, k, v, cu, cu, 30, 30, 0.2, True)
        assert_close(out, ref, *TOLERANCES[BF16], what="gated prefill")
    else:
        assert torch.isnan(out).all(), "a clean gate must leave the output to the other kernel"
