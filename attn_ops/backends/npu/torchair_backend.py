"""torchair's NPU backend with the attn ops served in every torchair mode.

Importing this module requires torchair (``import torchair``, shipped with torch_npu); it raises
ImportError elsewhere, by design. Not run on Ascend hardware (see docs/npu.md).

Example::

    import torchair
    from attn_ops.backends.npu.torchair_backend import get_npu_backend_with_attn

    config = torchair.CompilerConfig()
    config.mode = "reduce-overhead"          # or "npugraph_ex", or the default "max-autotune"
    model = torch.compile(model, backend=get_npu_backend_with_attn(compiler_config=config),
                          dynamic=False)
"""

from __future__ import annotations

import torchair

from attn_ops.backends.npu.torchair_decompose import decomposing_backend

# Modes that capture ACL graphs: the attn ops must become visible torch.ops.npu calls whose
# lengths torchair refreshes at each replay.
CAPTURE_MODES = ("reduce-overhead", "npugraph_ex")


def get_npu_backend_with_attn(*, compiler_config=None, custom_decompositions=None,
                              store_impl: str | None = None):
    """``torchair.get_npu_backend(...)`` that also handles ``torch.ops.attn.*``.

    * reduce-overhead / npugraph_ex: the graph is first rewritten by
      :func:`.torchair_decompose.decomposing_backend` (FIA / scatter calls, lengths lifted to
      graph inputs and fed from the host at each call).
    * max-autotune: the attn nodes stay and are converted by the GE converters of
      :mod:`.torchair_converters` (registered by this call), with lengths as tensors.

    Args:
        compiler_config: a ``torchair.CompilerConfig``; None means torchair's default.
        custom_decompositions: passed to ``torchair.get_npu_backend``.
        store_impl: force one cache-store op in capture modes (see ``lowering.STORE_IMPLS``).
    """
    config = compiler_config if compiler_config is not None else torchair.CompilerConfig()
    inner = torchair.get_npu_backend(compiler_config=config,
                                     custom_decompositions=dict(custom_decompositions or {}))
    if config.mode.value in CAPTURE_MODES:
        return decomposing_backend(inner, store_impl=store_impl)
    from attn_ops.backends.npu import torchair_converters  # noqa: F401  (registers converters)
    return inner
