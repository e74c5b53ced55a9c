"""Entry point kept at its published path: torchair's NPU compile backend with the attn ops.

The implementation lives with the rest of the NPU code in
:mod:`attn_ops.backends.npu.torchair_backend`; importing either requires torchair (shipped with
torch_npu) and raises ImportError elsewhere, by design. See docs/npu.md.
"""

from attn_ops.backends.npu.torchair_backend import CAPTURE_MODES, get_npu_backend_with_attn

__all__ = ["CAPTURE_MODES", "get_npu_backend_with_attn"]
