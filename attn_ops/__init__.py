"""attn_ops: LLM attention as torch.library custom ops, for torch.compile and torch.export.

Importing this package registers ``torch.ops.attn.store_kvcache``, ``prefill``, ``decode``,
``prefill_with_lse``, ``decode_with_lse`` and ``merge_states`` (with fake kernels). It imports
no triton, flash_attn or torch_npu and does not initialise CUDA: backends load when first used.
"""

from attn_ops.api import (decode, decode_with_lse, merge_states, prefill, prefill_with_lse,
                          store_kvcache)
from attn_ops.contract import (OpConfig, decode_config, merge_config, prefill_config,
                               store_config)
from attn_ops.paged_cache import CacheFull, DecodeBatch, PagedKVCache, PrefillBatch
from attn_ops.registry import BackendUnavailable, clear_cache, current_choice, explain, use_backend

__all__ = [
    "store_kvcache", "prefill", "decode", "prefill_with_lse", "decode_with_lse", "merge_states",
    "PagedKVCache", "PrefillBatch", "DecodeBatch", "CacheFull",
    "OpConfig", "store_config", "prefill_config", "decode_config", "merge_config",
    "use_backend", "current_choice", "explain", "clear_cache", "BackendUnavailable",
]
__version__ = "0.1.0"
