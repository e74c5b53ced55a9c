"""attn_ops on torch.distributed: tensor parallelism over heads and context-parallel prefill.

Not imported by ``import attn_ops`` (it imports ``torch.distributed.tensor``); import it where
the model is parallelised. Importing it registers the DTensor sharding rules of the attn ops
(:mod:`attn_ops.distributed.sharding`), so head-sharded DTensors run the ops with no
redistribution.

* :mod:`~attn_ops.distributed.tensor_parallel`: :class:`HeadShardedKVCache` (paged caches as
  head-sharded DTensors) and :func:`llama_tp_plan` (a ``parallelize_module`` plan).
* :mod:`~attn_ops.distributed.context_parallel`: :func:`context_parallel_prefill`, one long causal
  prefill split by sequence across ranks (load-balanced chunks, all-gather or ring).
"""

from attn_ops.distributed.context_parallel import (
    context_parallel_prefill, load_balanced_chunks, shard_sequence, unshard_sequence)
from attn_ops.distributed.sharding import register_sharding_rules
from attn_ops.distributed.tensor_parallel import HeadShardedKVCache, llama_tp_plan

register_sharding_rules()

__all__ = ["register_sharding_rules", "HeadShardedKVCache", "llama_tp_plan",
           "context_parallel_prefill", "load_balanced_chunks", "shard_sequence",
           "unshard_sequence"]
