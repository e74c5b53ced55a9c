"""The measured backend order that "auto" follows on CUDA, per op and static configuration.

The data is ``auto_table.json`` beside this file (or the file named by ``ATTN_OPS_AUTO_TABLE``),
written on a GPU by ``benchmarks/bench_auto_table.py`` (the ranking lives in
``benchmarks/auto_table_builder.py``) and committed; this module only loads and queries it. Its
keys are ``op|arch|dtype|head|kv``:

* ``op``: ``prefill``, ``decode`` or ``store_kvcache``;
* ``arch``: ``sm90`` ... (``torch.cuda.get_device_capability`` of the tensors' device);
* ``dtype``: ``bf16``, ``fp16``, ``fp32``;
* ``head``: ``d64``, ``d128``, ``d256``: the head dim rounded up to one of these;
* ``kv``: ``dense`` (prefill without a block table) or ``bs16`` ... ``bs256``: the block size
  rounded up to a power of two, capped at 256.

Only static features key the choice: sequence lengths are device data, and reading them would
cost a host sync (and break CUDA-graph capture). The lookup is a dictionary read, never a timing
run, so the choice is deterministic and safe inside a capture.

Lookup: the most specific key present wins, relaxing from the right::

    op|arch|dtype|head|kv -> op|arch|dtype|head|* -> op|arch|dtype|*|*
                          -> op|arch|*|*|*        -> op|*|*|*|*

No key at all gives None, and the registry uses its static default order. The order found is
followed by the members of :data:`FALLBACK` it lacks (a backend the benchmark could not run for
that key is still tried after the measured ones); the registry appends ``reference``.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path

import torch

from attn_ops.contract import OpConfig

TABLE_PATH = Path(__file__).with_name("auto_table.json")
# Tried after the measured order (the registry's static CUDA order).
FALLBACK = ("triton", "flash")
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
HEAD_BUCKETS = (64, 128, 256)
MAX_BLOCK_BUCKET = 256
WILDCARD = "*"
NUM_FEATURES = 5


def arch_of(device: torch.device) -> str:
    """``sm90`` for a compute-capability 9.0 device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


def head_bucket(head_dim: int) -> str:
    for b in HEAD_BUCKETS:
        if head_dim <= b:
            return f"d{b}"
    return f"d{head_dim}"


def kv_bucket(config: OpConfig) -> str:
    if not config.paged:
        return "dense"
    bucket, block_size = 16, config.block_size
    while bucket < block_size and bucket < MAX_BLOCK_BUCKET:
        bucket *= 2
    return f"bs{bucket}"


def features(config: OpConfig, arch: str) -> tuple[str, ...]:
    """``(op, arch, dtype, head, kv)`` for an op config (see :class:`attn_ops.contract.OpConfig`)."""
    dtype = DTYPES.get(config.dtype, str(config.dtype).replace("torch.", ""))
    return (config.op, arch, dtype, head_bucket(config.head_dim), kv_bucket(config))


def make_key(parts) -> str:
    return "|".join(parts)


def relaxed(parts: tuple, level: int) -> tuple:
    """``parts`` with its last ``level`` features (never the op) replaced by the wildcard."""
    keep = NUM_FEATURES - level
    return tuple(parts[:keep]) + (WILDCARD,) * level


def candidate_keys(parts: tuple) -> list[str]:
    """Keys to try, most specific first."""
    return [make_key(relaxed(parts, level)) for level in range(NUM_FEATURES)]


def _with_fallback(order) -> tuple[str, ...]:
    out = list(dict.fromkeys(order))
    out += [b for b in FALLBACK if b not in out]
    return tuple(out)


def _validate(table, where: str) -> dict:
    entries = table.get("entries") if isinstance(table, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f"{where}: expected a JSON object with an 'entries' object")
    for key, entry in entries.items():
        if len(key.split("|")) != NUM_FEATURES:
            raise ValueError(f"{where}: key {key!r} is not op|arch|dtype|head|kv")
        order = entry.get("order") if isinstance(entry, dict) else None
        if not order or not all(isinstance(b, str) for b in order):
            raise ValueError(f"{where}: entry {key!r} needs a non-empty 'order' list of names")
    return table


@functools.lru_cache(maxsize=4)
def load(path: str | None = None) -> dict:
    """The table at ``path`` (default: the committed one), validated; read once per path."""
    target = Path(path) if path else TABLE_PATH
    if not target.exists():
        warnings.warn(f"attn_ops auto table {target.name} is missing; 'auto' uses the static "
                      f"default order", stacklevel=2)
        return {"entries": {}}
    with open(target, encoding="utf-8") as f:
        return _validate(json.load(f), target.name)


def order_for(config: OpConfig, arch: str | None = None,
              table: dict | None = None) -> tuple[str, ...] | None:
    """Backends to try for ``config``, fastest first, or None without data.

    ``arch`` defaults to that of ``config.device``; ``table`` to :func:`load`'s.
    """
    if arch is None:
        if config.device.type != "cuda":
            return None
        arch = arch_of(config.device)
    if table is None:
        table = load(os.environ.get("ATTN_OPS_AUTO_TABLE") or None)
    entries = table["entries"]
    for key in candidate_keys(features(config, arch)):
        if key in entries:
            return _with_fallback(entries[key]["order"])
    return None
