"""The Gluon Hopper prefill's machine code for sm_90a, form by form (tests/support/sass.py:
compiled only, as a launch of each call shape specialises the kernel, on a 132-SM device).
Triton 3.6 (the GPU machine's) builds it; CI's Triton 3.9 lays Gluon out differently, so this
runs with the GPU tests.

What a regression would show first:
- ptxas serialising the wgmma pipeline (its "Potential Performance Loss" note: every MMA waited
  for before the next). Waiting for ``P V`` at the top of the next step instead of the end of
  this one got exactly that ("insufficient register resources"), at either key step.
- A spill inside a key loop, or one more wait per step than the two the source has (``S_j``
  with one MMA left in flight, then ``P_{j-1} V_{j-1}``).
- Spills elsewhere: none over dense K/V; the paged and ``COMPACT`` builds reload 16 bytes of the
  kernel's entry values once per item (docs/backends.md, "the Gluon prefill's consumers, as
  compiled").
"""

import pytest

from tests.support import sass

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not sass.available(),
                                 reason="Triton's ptxas / cuobjdump are not installed")]

# (form, consumer warpgroups, spill bytes allowed outside the key loops)
FORMS = [
    pytest.param(dict(batch=4, seqlen=4096), 2, 0, id="duo-causal"),
    pytest.param(dict(batch=4, seqlen=4096, causal=False), 2, 0, id="duo-non-causal"),
    pytest.param(dict(batch=4, seqlen=4096, head_dim=64), 2, 0, id="duo-d64"),
    pytest.param(dict(batch=64, seqlen=256), 1, 0, id="solo"),
    pytest.param(dict(batch=64, seqlen=256, head_dim=64), 1, 0, id="solo-d64"),
    pytest.param(dict(batch=16, seqlen=8, page=16, context=2040), 1, 0, id="packed-paged"),
    pytest.param(dict(batch=64, seqlen=256, page=16, context=128), 1, 0, id="solo-paged"),
    pytest.param(dict(batch=2, seqlen=512, page=16, context=3584), 2, 16, id="duo-paged-chunk"),
    pytest.param(dict(batch=4, seqlen=4096, min_q=1), 2, 16, id="duo-compact"),
    # sinks and the lse (the rows' finish, under the item's last P V): the two-consumer build
    # spills 16 bytes of the kernel's entry values, stored once and reloaded once per
    # partition (ptxas for sm_90a, Triton 3.6), none per item
    pytest.param(dict(batch=4, seqlen=4096, sinks=True, lse=True), 2, 16, id="duo-sinks-lse"),
    pytest.param(dict(batch=64, seqlen=256, sinks=True, lse=True), 1, 0, id="solo-sinks-lse"),
    pytest.param(dict(batch=16, seqlen=8, page=16, context=2040, sinks=True, lse=True), 1, 0,
                 id="packed-paged-sinks-lse"),
]


def _key_loops(build: sass.Build) -> list[list[str]]:
    """The innermost loops that issue wgmma (HGMMA): each consumer warpgroup's key walk."""
    return [b for b in build.loops(innermost=True) if any("HGMMA" in t for t in b)]


@pytest.mark.parametrize("form, consumers, spill", FORMS)
def test_each_form_keeps_its_wgmma_pipeline(form, consumers, spill):
    build = sass.build_hopper_prefill(**form)
    assert build.notes == [], build.notes
    loops = _key_loops(build)
    assert len(loops) == consumers, [len(b) for b in loops]
    for body in loops:
        assert not [t for t in body if "LDL" in t or "STL" in t], "a spill in a key loop"
        waits = sum("WARPGROUP.DEPBAR" in t for t in body)
        assert waits == 2, f"{waits} wgmma waits per key step"
    assert build.stack <= spill, build.stack
