"""attn_ops: LLM attention as torch.library custom ops, for torch.compile and torch.export.

Importing this package registers ``torch.ops.attn.store_kvcache``, ``torch.ops.attn.prefill`` and
``torch.ops.attn.decode`` (with fake kernels). It imports no triton, flash_attn or torch_npu and
does not initialise CUDA: backends load when first used.
"""

from attn_ops.ops import decode, prefill, store_kvcache
from attn_ops.paged_cache import CacheFull, DecodeBatch, PagedKVCache, PrefillBatch
from attn_ops.registry import BackendUnavailable, current_choice, explain, use_backend

__all__ = [
    "store_kvcache", "prefill", "decode",
    "PagedKVCache", "PrefillBatch", "DecodeBatch", "CacheFull",
    "use_backend", "current_choice", "explain", "BackendUnavailable",
]
__version__ = "0.1.0"
