"""The split-KV decode kernel's plan (decode_plan.py), off the GPU: the split count where the
wave rule's programs pass what the SMs hold at once."""

import pytest

pytest.importorskip("triton")
from attn_ops.backends.triton import decode_plan  # noqa: E402


def _splits(batch, capacity=2048 * 16, resident=decode_plan.DEFAULT_RESIDENT):
    return decode_plan.num_splits(batch, 8, capacity, 132, 64, resident)


def test_splits_never_leave_a_last_wave_nearly_empty():
    # 132 SMs holding 4 programs each: 528 at once. The wave rule's counts (3 x 132 programs)
    # where they fit one wave stay: B 17 and 20 (136 and 160 programs) at 3 splits.
    assert _splits(17) == 3 and _splits(20) == 3
    # B 23 and 24 (184, 192): 3 splits are 552 and 576 programs, two waves; 2 splits are one.
    assert _splits(23) == 2 and _splits(24) == 2 and _splits(25) == 2
    # B 34 and 40 (272, 320): the wave rule's 2 splits give 1.03 and 1.2 waves; 3 splits 1.55 and
    # 1.8 waves of a third of the keys each
    assert _splits(34) == 3 and _splits(40) == 3
    # B 48 (384): 1, 2 and 3 splits all take a wave per split's length: the fewest
    assert _splits(48) == 1
    # where the wave rule asks for one split, one split (B 64 and past it)
    assert _splits(64) == 1 and _splits(70) == 1 and _splits(256) == 1
    # many splits for few programs, as before: B 6 (48 programs) 9 splits (432 at once)
    assert _splits(6) == 9 == _splits(6, resident=0)
    # without the residency (other configs): the wave rule alone
    assert _splits(24, resident=0) == 3 and _splits(34, resident=0) == 2
    # a short table bounds the count: 1 or 2 splits of 256 keys, one wave per split's length
    assert _splits(34, capacity=512) == 1 and _splits(34, capacity=512, resident=0) == 2
