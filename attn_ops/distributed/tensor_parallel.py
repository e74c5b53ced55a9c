"""Tensor parallelism over attention heads: a head-sharded paged cache and a Llama-style plan.

With the DTensor rules of :mod:`attn_ops.distributed.sharding`, the attn ops run on head-sharded
DTensors with no communication; what a tensor-parallel model still needs is

* caches that are DTensors sharded on their head dim: :class:`HeadShardedKVCache` plans exactly
  like :class:`~attn_ops.paged_cache.PagedKVCache` (the same slots and block tables on every rank:
  planning is deterministic) but each rank allocates only its ``Hkv / R`` kv heads, and
  ``k_cache(layer)`` / ``v_cache(layer)`` return them as ``Shard(2)`` DTensors over the mesh;
* q / k / v projections whose outputs stay DTensors (``ColwiseParallel(use_local_output=False)``),
  so ``view(T, H, D)`` with the global head count gives ``Shard(1)``, and an output projection that
  takes ``Shard(1)`` input: :func:`llama_tp_plan`, for the module names of
  :class:`attn_ops.demo.model.DemoLlama` (and of most Llama ports).

Plain tensors that meet DTensors (rotary tables, cu_seqlens, block tables) are treated as
replicated inside ``torch.distributed.tensor.experimental.implicit_replication()``.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from attn_ops.paged_cache import PagedKVCache


class HeadShardedKVCache:
    """A :class:`PagedKVCache` whose K/V caches are DTensors sharded on the kv-head dim.

    Args:
        mesh: a 1-D device mesh (the tensor-parallel group); ``num_kv_heads % mesh.size() == 0``.
        num_blocks, block_size, num_kv_heads, head_dim, max_seq_len, num_layers, dtype, device:
            as for :class:`PagedKVCache`; ``num_kv_heads`` is the global Hkv, each rank allocates
            ``[num_blocks, block_size, Hkv / R, D]`` per layer.

    Every planning method (``prepare_prefill``, ``prepare_decode``, ``fork``, ``free``, ...) is
    the local planner's: call them with the same arguments on every rank, in the same order.
    """

    def __init__(self, mesh: DeviceMesh, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, *, max_seq_len: int, num_layers: int = 1,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu"):
        if mesh.ndim != 1:
            raise ValueError(f"mesh: expected the 1-D tensor-parallel mesh, got {mesh.ndim}-D")
        size = mesh.size()
        if num_kv_heads % size:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must be a multiple of the tensor-"
                             f"parallel size ({size}): each rank holds whole kv heads")
        self.mesh = mesh
        self.num_kv_heads = num_kv_heads
        self.local = PagedKVCache(num_blocks, block_size, num_kv_heads // size, head_dim,
                                  max_seq_len=max_seq_len, num_layers=num_layers, dtype=dtype,
                                  device=device)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self._k = [self._wrap(self.local.k_cache(i), shape) for i in range(num_layers)]
        self._v = [self._wrap(self.local.v_cache(i), shape) for i in range(num_layers)]

    def _wrap(self, local: torch.Tensor, shape) -> DTensor:
        # The global stride of a contiguous [N, bs, Hkv, D] cache; no check across ranks needed:
        # every rank allocated the same local shape.
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, [Shard(2)], run_check=False, shape=shape,
                                  stride=stride)

    def k_cache(self, layer: int = 0) -> DTensor:
        """Layer ``layer``'s K cache: a ``Shard(2)`` DTensor ``[num_blocks, block_size, Hkv, D]``
        whose local tensor is this rank's ``Hkv / R`` heads (written in place by the ops)."""
        return self._k[layer]

    def v_cache(self, layer: int = 0) -> DTensor:
        return self._v[layer]

    def __getattr__(self, name):  # planning and bookkeeping: the local planner's
        if name == "local":
            raise AttributeError(name)
        return getattr(self.local, name)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self.local


def llama_tp_plan(num_layers: int, layers: str = "layers", attn: str = "attn",
                  mlp: str = "mlp", lm_head: str | None = "lm_head") -> dict:
    """A ``parallelize_module`` plan splitting a Llama-style model over heads and MLP columns.

    Per layer: ``q_proj``/``k_proj``/``v_proj`` column-parallel with DTensor outputs (the attn ops
    then see head-sharded q/k/v), ``o_proj`` row-parallel from ``Shard(1)`` (the head dim of the
    flattened ``[T, H*D]`` attention output), ``gate_proj``/``up_proj`` column-parallel and
    ``down_proj`` row-parallel (one all-reduce after attention and one after the MLP). The LM head
    is column-parallel with replicated logits. Embedding and norms stay replicated.
    """
    plan = {}
    for i in range(num_layers):
        a, m = f"{layers}.{i}.{attn}", f"{layers}.{i}.{mlp}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            plan[f"{a}.{proj}"] = ColwiseParallel(use_local_output=False)
        plan[f"{a}.o_proj"] = RowwiseParallel(input_layouts=Shard(1))
        plan[f"{m}.gate_proj"] = ColwiseParallel()
        plan[f"{m}.up_proj"] = ColwiseParallel()
        plan[f"{m}.down_proj"] = RowwiseParallel()
    if lm_head is not None:
        plan[lm_head] = ColwiseParallel(output_layouts=Replicate())
    return plan
