"""The Gluon Hopper kernels compile for sm_90a under the Triton installed here (CI's: 3.9; the
GPU machine's: 3.6), no GPU needed (tests/support/sass.py). Triton renamed two Gluon builtins
after 3.6 (attn_ops/backends/triton/gluon_api.py); a kernel that calls a name the installed
Triton lacks fails only when it compiles, which without this test is at its first launch on a
user's H100 / H200, where the Triton backend routes prefill and decode to these kernels."""

import pytest

from attn_ops.backends.triton.hopper_decode_kernel import GLUON
from tests.support import sass

pytestmark = [
    pytest.mark.skipif(not GLUON, reason="this Triton has no Gluon Hopper API"),
    pytest.mark.skipif(not sass.available(), reason="Triton's ptxas / cuobjdump are not installed"),
]


def test_the_hopper_names_resolve_to_gluon_builtins():
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import tma

    from attn_ops.backends.triton import gluon_api
    assert gluon_api.tma_load in (getattr(tma, "async_load", None),
                                  getattr(tma, "async_copy_global_to_shared", None))
    assert gluon_api.thread_barrier in (getattr(gl, "thread_barrier", None),
                                        getattr(gl, "barrier", None))


def test_the_gluon_decode_compiles_for_sm90():
    # B 16 over pages of 16 (the form does not depend on the batch: one build)
    build = sass.build_hopper_decode(batch=16)
    assert build.registers <= 128 and build.stack == 0  # maxnreg: two programs per SM
    assert any("HGMMA" in text for _, text in build.instructions)  # wgmma, not mma.sync
    assert any("UTMALDG" in text for _, text in build.instructions)  # TMA copies


def test_the_gluon_prefill_compiles_for_sm90():
    # The paged one-consumer form: the page-piece loads and the dense Q load both (the
    # two-consumer forms compile in the GPU tests, test_hopper_prefill_sass.py)
    build = sass.build_hopper_prefill(batch=64, seqlen=256, page=16, context=128)
    assert any("HGMMA" in text for _, text in build.instructions)
    assert any("UTMALDG" in text for _, text in build.instructions)
