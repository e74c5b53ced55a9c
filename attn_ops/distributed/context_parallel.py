"""Context parallelism: one long causal prefill split by sequence across the ranks of a group.

Layout (causal load balance). The sequence of ``S`` tokens is cut into ``2R`` chunks of
``C = S / 2R`` tokens; rank ``r`` holds chunks ``r`` and ``2R - 1 - r``
(:func:`load_balanced_chunks`, :func:`shard_sequence`), so every rank owns one early and one late
chunk and computes the same number of (query, key) pairs, ``2 C^2`` per ring step and
``2R C^2`` in all, where contiguous chunks would give the last rank ``4R - 1`` times the first's.

Two ways to bring every query chunk its keys (``method=``):

* ``"allgather"``: all-gather K and V (each rank then holds the whole sequence's keys) and one
  ``attn.prefill`` call per rank over two sequences: query chunk ``g`` with keys chunks ``0 .. g``
  laid out in order (bottom-right causal: query ``i`` of chunk ``g`` sees key ``j <= g*C + i``).
  No merge, no log-sum-exp; the gather is not overlapped with compute.
* ``"ring"``: K/V travel around the ring (P2P, one step ahead of the compute, so the transfer of
  step ``s + 1`` overlaps the attention of step ``s``); each step's partial attention comes from
  ``attn.prefill_with_lse`` and is folded into the running result with ``attn.merge_states``.
  Step 0 (own keys) is causal; at step ``s`` the keys of rank ``src = r - s`` arrive and, because
  chunk ``src`` is early and chunk ``2R-1-src`` late, either both local query chunks see key chunk
  ``src`` in full (``src < r``) or the late query chunk sees both key chunks in full (``src > r``).

The result is this rank's rows of the output, in its input order (chunk ``r`` then chunk
``2R-1-r``); :func:`unshard_sequence` gathers the whole sequence back. Batch 1, causal, no window
or softcap; q ``[2C, H, D]``, k/v ``[2C, Hkv, D]`` on every rank. No host sync: chunk sizes come
from shapes, and the small metadata tensors are built once per (size, rank, device).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

import attn_ops  # noqa: F401  (registers torch.ops.attn.*)

METHODS = ("allgather", "ring")
# torch 2.13 renamed all_gather_into_tensor (same arguments); older torch has only the old name.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def load_balanced_chunks(world: int, rank: int) -> tuple[int, int]:
    """The two chunks (of ``2 * world``) rank ``rank`` holds: one early, one late."""
    return rank, 2 * world - 1 - rank


def shard_sequence(x: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """This rank's rows of a whole sequence ``x [S, ...]``: chunks ``rank`` and
    ``2*world-1-rank`` of ``S / (2*world)`` rows, concatenated (``[S / world, ...]``)."""
    if x.shape[0] % (2 * world):
        raise ValueError(f"x: the sequence length {x.shape[0]} must be a multiple of 2 * world "
                         f"= {2 * world} (two chunks per rank)")
    chunks = x.chunk(2 * world)
    a, b = load_balanced_chunks(world, rank)
    return torch.cat([chunks[a], chunks[b]])


def unshard_sequence(local: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Inverse of :func:`shard_sequence` across the group: every rank's ``[2C, ...]`` rows ->
    the whole ``[2C * world, ...]`` sequence in token order (an all-gather)."""
    world = dist.get_world_size(group)
    gathered = local.new_empty((world * local.shape[0], *local.shape[1:]))
    _all_gather(gathered, local.contiguous(), group=group)
    gathered = gathered.view(world, *local.shape)  # gloo wants the flat [world * 2C, ...] form
    c = local.shape[0] // 2
    parts = [None] * (2 * world)
    for r in range(world):
        a, b = load_balanced_chunks(world, r)
        parts[a], parts[b] = gathered[r, :c], gathered[r, c:]
    return torch.cat(parts)


@functools.lru_cache(maxsize=64)
def _allgather_plan(world: int, rank: int, c: int, device: torch.device):
    """cu_seqlens_q, cu_seqlens_k and the chunk order of the keys over the gathered K/V.

    Chunk ``g`` sits at ``2*src + j`` of the gathered ``[2R, C, ...]`` buffer, where
    ``load_balanced_chunks(world, src)[j] == g``. The keys are chunks ``0 .. a`` (for query chunk
    ``a``) followed by chunks ``0 .. b`` (for ``b``): two sequences of the THD layout.
    """
    block_of = {}
    for src in range(world):
        for j, chunk in enumerate(load_balanced_chunks(world, src)):
            block_of[chunk] = 2 * src + j
    a, b = load_balanced_chunks(world, rank)
    order = [block_of[i] for i in range(a + 1)] + [block_of[i] for i in range(b + 1)]
    cu_q = torch.tensor([0, c, 2 * c], dtype=torch.int32)
    cu_k = torch.tensor([0, (a + 1) * c, (a + b + 2) * c], dtype=torch.int32)
    return cu_q.to(device), cu_k.to(device), torch.tensor(order).to(device)


def _prefill_allgather(q, k, v, scale, group):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    c, hkv, d = k.shape[0] // 2, k.shape[1], k.shape[2]
    cu_q, cu_k, order = _allgather_plan(world, rank, c, q.device)
    keys = []
    for x in (k, v):
        gathered = x.new_empty((world * 2 * c, hkv, d))  # gloo wants the flat form
        _all_gather(gathered, x.contiguous(), group=group)
        # One gather kernel lays out both sequences' keys, (2R + 1) C rows: on one H200 the
        # same prefill read through a block table of C-token pages ran at 0.78x (374 vs 480
        # TFLOP/s at 32768 tokens) of the dense one, and this copy costs ~0.1 ms.
        keys.append(gathered.view(2 * world, c, hkv, d).index_select(0, order).view(-1, hkv, d))
    _, b = load_balanced_chunks(world, rank)
    return torch.ops.attn.prefill(q, keys[0], keys[1], cu_q, cu_k, c, (b + 1) * c, scale, True)


@functools.lru_cache(maxsize=64)
def _ring_plan(c: int, device: torch.device) -> dict[str, torch.Tensor]:
    """cu_seqlens of the ring's call shapes: two query chunks ``[0, C, 2C]``, their step-0 keys
    ``[0, C, 3C]`` (``k_a`` then ``k_a, k_b``), and one chunk over two ``[0, C]`` / ``[0, 2C]``."""
    rows = {"pair": [0, c, 2 * c], "step0_k": [0, c, 3 * c], "one_q": [0, c], "one_k": [0, 2 * c]}
    return {n: torch.tensor(r, dtype=torch.int32).to(device) for n, r in rows.items()}


def _lse_ops():
    """(prefill_with_lse, merge_states): the ring's two ops."""
    return torch.ops.attn.prefill_with_lse, torch.ops.attn.merge_states


def _exchange(kv: torch.Tensor, group, world: int, rank: int):
    """Start sending ``kv`` to the next rank and receiving the previous rank's; returns
    (buffer, requests)."""
    recv = torch.empty_like(kv)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    if group is not None:  # P2POp takes global ranks
        nxt, prv = dist.get_global_rank(group, nxt), dist.get_global_rank(group, prv)
    ops = [dist.P2POp(dist.isend, kv, nxt, group), dist.P2POp(dist.irecv, recv, prv, group)]
    return recv, dist.batch_isend_irecv(ops)


def _prefill_ring(q, k, v, scale, group):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    c = q.shape[0] // 2
    cu = _ring_plan(c, q.device)
    with_lse, merge = _lse_ops()
    kv = torch.stack([k, v])  # [2, 2C, Hkv, D]: one message per step
    pending = _exchange(kv, group, world, rank) if world > 1 else None
    # Step 0, own keys: chunk a sees k_a causally, chunk b sees [k_a, k_b] causally (k_a repeated
    # so that each query chunk's keys are one contiguous range of the THD layout).
    keys = torch.cat([kv[:, :c], kv], dim=1)
    out, lse = with_lse(q, keys[0], keys[1], cu["pair"], cu["step0_k"], c, 2 * c, scale, True)
    for step in range(1, world):
        recv, requests = pending
        for req in requests:
            req.wait()
        # Forward what just arrived before computing on it: the next transfer overlaps this step.
        pending = _exchange(recv, group, world, rank) if step + 1 < world else None
        src = (rank - step) % world
        if src < rank:  # both query chunks see key chunk src (early) in full
            keys = torch.cat([recv[:, :c], recv[:, :c]], dim=1)
            part = with_lse(q, keys[0], keys[1], cu["pair"], cu["pair"], c, c, scale, False)
            out, lse = merge(out, lse, *part)
        else:  # the late query chunk sees both key chunks of src in full; the early one none
            part = with_lse(q[c:], recv[0], recv[1], cu["one_q"], cu["one_k"], c, 2 * c, scale,
                            False)
            late_out, late_lse = merge(out[c:], lse[c:], *part)
            out[c:], lse[c:] = late_out, late_lse
    return out


def context_parallel_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                             group: dist.ProcessGroup | None = None,
                             method: str = "allgather") -> torch.Tensor:
    """Causal attention of one long sequence whose tokens are spread over the group's ranks.

    Every rank calls this with its rows (:func:`shard_sequence` of the whole q / k / v).

    Args:
        q: ``[2C, H, D]``, this rank's query chunks ``r`` and ``2R-1-r`` (``C`` tokens each).
        k, v: ``[2C, Hkv, D]``, the same token rows' keys and values (same dtype and device).
        scale: multiplies q·k (usually ``D ** -0.5``).
        group: the context-parallel process group (default: the whole world).
        method: ``"allgather"`` (gather K/V, one paged ``attn.prefill``) or ``"ring"`` (P2P ring,
            ``attn.prefill_with_lse`` + ``attn.merge_states``); same result up to rounding.

    Returns:
        ``[2C, H, D]`` in q's dtype: this rank's rows of causal attention over the whole sequence.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"q: expected [2C, H, D] and k, v [2C, Hkv, D], got q {list(q.shape)}, "
                         f"k {list(k.shape)}, v {list(v.shape)}")
    if q.shape[0] % 2 or q.shape[0] != k.shape[0] or q.shape[0] == 0:
        raise ValueError(f"q, k, v: expected the same even, non-zero number of rows (two chunks "
                         f"of C tokens), got q {q.shape[0]}, k {k.shape[0]}")
    if method == "ring":
        return _prefill_ring(q, k, v, scale, group)
    return _prefill_allgather(q, k, v, scale, group)
