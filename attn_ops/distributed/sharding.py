"""DTensor sharding rules of the attn ops: tensor parallelism over attention heads.

Attention is independent per head, so a tensor-parallel rank that holds heads ``[r*H/R,
(r+1)*H/R)`` of q and kv heads ``[r*Hkv/R, (r+1)*Hkv/R)`` of k, v and the caches computes its
heads' outputs with no communication. With ``H % R == 0`` and ``Hkv % R == 0`` the local GQA
ratio ``(H/R) / (Hkv/R)`` equals the global one, so the local query head ``h`` still reads the local
kv head ``h // (H // Hkv)``: the op runs unchanged on the local shards.

The rules registered here (``torch.distributed.tensor.experimental.register_sharding``) tell
DTensor exactly that, for every op of ``torch.ops.attn`` that exists:

* head-sharded: q / k / v / key / value / caches / outputs ``Shard(ndim - 2)`` (the head dim of
  ``[T, H, D]`` and of ``[num_blocks, block_size, Hkv, D]``), lse ``[T, H]`` ``Shard(1)``,
  sinks ``[H]`` and per-head scales ``[Hkv]`` ``Shard(0)``, everything else (cu_seqlens,
  block tables, seqlens, slot mappings, scalar scales) ``Replicate``;
* everything replicated;
* merge_states only: also sharded on tokens (``Shard(0)`` of every operand), as it is row-wise.

A call whose operands already follow one of these placements runs with no redistribution.

``store_kvcache`` writes its caches in place, but its name does not end in ``_``, so DTensor does
not know it mutates: were it to redistribute a cache to fit a rule, the write would land in a
temporary copy and be lost without a word. Its rule therefore follows the caches' own placement
(head-sharded caches take head-sharded key/value, replicated caches replicated ones) and any other
cache placement, or a mesh of more than one dimension, raises. Use the tensor-parallel sub-mesh.

Importing :mod:`attn_ops.distributed` registers the rules; :func:`register_sharding_rules` is
idempotent and picks up ops registered later (e.g. when a newer attn_ops adds one).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor.experimental import register_sharding

import attn_ops  # noqa: F401  (registers torch.ops.attn.*)

# Arguments that carry heads. Every other tensor argument is metadata and stays replicated.
# q/k/v/key/value and the caches keep heads at ndim - 2; these keep them at dim 0.
_PER_HEAD_VECTORS = ("sinks", "k_scale", "v_scale")
_HEADED = ("q", "k", "v", "key", "value", "k_cache", "v_cache", "out_a", "out_b")
_LSE = ("lse_a", "lse_b")

_REGISTERED: set[str] = set()


def head_placement(name: str, spec) -> Shard | Replicate | None:
    """The head-sharded placement of argument ``name`` (``spec`` its DTensorSpec, or not a tensor).

    Returns None for non-tensor arguments (what ``register_sharding`` expects for them).
    """
    if not isinstance(spec, DTensorSpec):
        return None
    if name in _HEADED:
        return Shard(spec.ndim - 2)
    if name in _LSE:
        return Shard(1)
    if name in _PER_HEAD_VECTORS:
        return Shard(0) if spec.ndim == 1 else Replicate()  # a [] scale is shared by all heads
    return Replicate()


def _named_args(op: torch._ops.OpOverload, args, kwargs) -> list[tuple[str, object]]:
    """(schema name, value) of every argument, positional first, then keywords as DTensor orders
    them (the order of the input placements ``register_sharding`` expects)."""
    names = [a.name for a in op._schema.arguments]
    return list(zip(names, args)) + list(kwargs.items())


def _mesh_size(named) -> int:
    spec = next(s for _, s in named if isinstance(s, DTensorSpec))
    return spec.mesh.size()


def _heads_divide(named, size: int) -> bool:
    """Whether every head-carrying operand splits evenly over ``size`` ranks (uneven head shards
    would break the local GQA mapping ``h // (H // Hkv)``)."""
    for name, spec in named:
        placement = head_placement(name, spec)
        if isinstance(placement, Shard) and spec.shape[placement.dim] % size:
            return False
    return True


def _strategies(named, num_outputs: int, head_outputs: list) -> list:
    """[all replicated] plus [head-sharded] when the heads divide evenly over the mesh."""
    replicated = ([Replicate()] * num_outputs,
                  [None if not isinstance(s, DTensorSpec) else Replicate() for _, s in named])
    out = [replicated]
    if _heads_divide(named, _mesh_size(named)):
        out.append((head_outputs, [head_placement(n, s) for n, s in named]))
    return out


def _attention_rule(op: torch._ops.OpOverload, num_outputs: int):
    """prefill / decode (one output, ``[T, H, D]``) and their ``_with_lse`` forms (+ lse)."""
    head_outputs = [Shard(1), Shard(1)][:num_outputs]  # out [T, H, D] and lse [T, H]: dim 1

    def rule(*args, **kwargs):
        return _strategies(_named_args(op, args, kwargs), num_outputs, head_outputs)
    return rule


def _merge_states_rule(op: torch._ops.OpOverload):
    """Row-wise: heads or tokens may be sharded, as long as all four operands agree."""
    def rule(*args, **kwargs):
        named = _named_args(op, args, kwargs)
        out = _strategies(named, 2, [Shard(1), Shard(1)])
        if all(s.shape[0] % _mesh_size(named) == 0 for _, s in named):
            out.append(([Shard(0), Shard(0)], [Shard(0)] * 4))
        return out
    return rule


def _store_rule(op: torch._ops.OpOverload):
    """Follow the caches' placement: redistributing a written cache would lose the write."""
    def rule(*args, **kwargs):
        named = _named_args(op, args, kwargs)
        caches = {n: s for n, s in named if n in ("k_cache", "v_cache")}
        spec = caches["k_cache"]
        if spec.mesh.ndim != 1:
            raise ValueError(
                f"attn.store_kvcache under DTensor: the caches live on a {spec.mesh.ndim}-D mesh; "
                f"use the 1-D tensor-parallel sub-mesh (e.g. mesh['tp']) for the caches and key/"
                f"value, so the in-place write is never redistributed")
        placements = {n: tuple(s.placements) for n, s in caches.items()}
        head = (Shard(spec.ndim - 2),)
        if set(placements.values()) == {head}:
            inputs = [head_placement(n, s) for n, s in named]
        elif set(placements.values()) == {(Replicate(),)}:
            inputs = [None if not isinstance(s, DTensorSpec) else Replicate() for _, s in named]
        else:
            raise ValueError(
                f"attn.store_kvcache under DTensor: k_cache and v_cache must both be sharded on "
                f"their head dim (Shard(2) of [num_blocks, block_size, Hkv, D]) or both "
                f"replicated, got k_cache {placements['k_cache']} and v_cache "
                f"{placements['v_cache']}; the op writes them in place, so they cannot be "
                f"redistributed")
        return [([], inputs)]
    return rule


def register_sharding_rules() -> list[str]:
    """Register the DTensor rules of every ``torch.ops.attn`` op that exists and has none yet.

    Returns the names of the ops registered by this call (empty when all already were).
    """
    rules = {
        "store_kvcache": lambda op: _store_rule(op),
        "prefill": lambda op: _attention_rule(op, 1),
        "decode": lambda op: _attention_rule(op, 1),
        "prefill_with_lse": lambda op: _attention_rule(op, 2),
        "decode_with_lse": lambda op: _attention_rule(op, 2),
        "merge_states": lambda op: _merge_states_rule(op),
    }
    done = []
    for name, make in rules.items():
        if name in _REGISTERED or not hasattr(torch.ops.attn, name):
            continue
        op = getattr(torch.ops.attn, name).default
        register_sharding(op)(make(op))
        _REGISTERED.add(name)
        done.append(name)
    return done
