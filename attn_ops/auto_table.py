"""The measured backend order that "auto" follows on CUDA, per op and static configuration.

The data is ``auto_table.json`` beside this file (or the file named by ``ATTN_OPS_AUTO_TABLE``),
written on a GPU by ``benchmarks/bench_auto_table.py`` (the ranking lives in
``benchmarks/auto_table_builder.py``) and committed; this module only loads and queries it. Its
keys are ``op|arch|dtype|head|kv|keys``:

* ``op``: ``prefill``, ``decode`` or ``store_kvcache``;
* ``arch``: ``sm90`` ... (``torch.cuda.get_device_capability`` of the tensors' device);
* ``dtype``: ``bf16``, ``fp16``, ``fp32``;
* ``head``: ``d64``, ``d128``, ``d256``: the head dim rounded up to one of these;
* ``kv``: ``dense`` (prefill without a block table) or ``bs16`` ... ``bs256``: the block size
  rounded up to a power of two, capped at 256;
* ``keys``: for prefill ``short`` (its ``max_seqlen_k`` at most
  :data:`attn_ops.contract.SHORT_PREFILL_KEYS`) or ``long``; ``any`` for the other ops, and for a
  prefill config built without its ``max_seqlen_k``.

Only static features key the choice: sequence lengths are device data, and reading them would
cost a host sync (and break CUDA-graph capture); ``max_seqlen_k`` is a host int of the call
(and part of the op path's memo key, so the bucket costs nothing per call). The lookup is a
dictionary read, never a timing run, so the choice is deterministic and safe inside a capture.

Lookup: the most specific key present wins, relaxing from the right::

    op|arch|dtype|head|kv|keys -> op|arch|dtype|head|kv|* -> op|arch|dtype|head|*|*
                               -> ...                      -> op|*|*|*|*|*

Tables of format versions 1 and 2 had no ``keys`` feature; their keys are read with one appended
(:func:`upgrade_key`): ``any`` for a fully specific key of another op than prefill, ``*``
otherwise (a prefill measured over prompts of any length stands for both buckets).

No key at all gives None, and the registry uses its static default order. The order found is
followed by the members of :data:`FALLBACK` it lacks (a backend the benchmark could not run for
that key is still tried after the measured ones); the registry appends ``reference``.

Flash providers (format version 2). The ``flash`` backend is served by very different kernels
(on an H200, dense bf16 d128 prefill on FA3 is 1.42-1.62x our Triton kernel, PyTorch's own FA2
0.78x of it), so a version-2 order names the provider a flash timing was measured with:
``flash:fa3_fwd``, ``flash:aten`` (the ids of :data:`attn_ops.backends.flash.PROVIDER_ORDER`).
Such an item stands for ``flash`` only where the flash backend would serve the config with that
provider (:func:`flash_provider`), and is skipped elsewhere; a plain ``flash`` item (version 1)
means whichever provider is installed, as before. A measured version-2 entry also keeps its
``runs``: one per flash provider measured (or none), each with its own ``order``, ``median_us``,
``speedup``, ``device``, ``date`` and ``source``; its ``order`` is their merge (built by
``benchmarks/auto_table_builder.py``), so one key holds the rows of several machines/installs.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Callable
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
NUM_FEATURES = 6
# 2: flash items may name their provider ("flash:fa3_fwd"); runs per entry. 3: the keys feature.
VERSIONS = (1, 2, 3)
KEYS_FEATURE_SINCE = 3
PROVIDER_SEP = ":"


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


def keys_bucket(config: OpConfig) -> str:
    if config.short_keys is None:
        return "any"
    return "short" if config.short_keys else "long"


def features(config: OpConfig, arch: str) -> tuple[str, ...]:
    """``(op, arch, dtype, head, kv, keys)`` for an op config (see
    :class:`attn_ops.contract.OpConfig`)."""
    dtype = DTYPES.get(config.dtype, str(config.dtype).replace("torch.", ""))
    return (config.op, arch, dtype, head_bucket(config.head_dim), kv_bucket(config),
            keys_bucket(config))


def upgrade_key(key: str) -> str:
    """A key of a table without the ``keys`` feature (format 1 or 2) in today's form (module
    doc); a key with all features is returned as it is."""
    parts = key.split("|")
    if len(parts) == NUM_FEATURES:
        return key
    specific = WILDCARD not in parts and parts[0] != "prefill"
    return make_key(parts + ["any" if specific else WILDCARD])


def upgraded(table: dict) -> dict:
    """``table`` with its keys in today's form (a copy for formats 1 and 2)."""
    if table.get("version", 1) >= KEYS_FEATURE_SINCE:
        return table
    return {**table, "version": KEYS_FEATURE_SINCE,
            "entries": {upgrade_key(k): e for k, e in table["entries"].items()}}


def make_key(parts) -> str:
    return "|".join(parts)


def relaxed(parts: tuple, level: int) -> tuple:
    """``parts`` with its last ``level`` features (never the op) replaced by the wildcard."""
    keep = NUM_FEATURES - level
    return tuple(parts[:keep]) + (WILDCARD,) * level


def candidate_keys(parts: tuple) -> list[str]:
    """Keys to try, most specific first."""
    return [make_key(relaxed(parts, level)) for level in range(NUM_FEATURES)]


def split_item(item: str) -> tuple[str, str | None]:
    """``("flash", "fa3_fwd")`` for ``"flash:fa3_fwd"``; ``(name, None)`` for a plain name."""
    backend, _, provider = item.partition(PROVIDER_SEP)
    return backend, provider or None


def _with_fallback(order) -> tuple[str, ...]:
    out = list(dict.fromkeys(order))
    out += [b for b in FALLBACK if b not in out]
    return tuple(out)


def resolve(order, provider: str | None) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """``(backends, skipped)`` for a table order where the flash backend would serve the config
    with ``provider`` (None: no flash provider fits). ``flash:<p>`` becomes ``flash`` when ``p``
    is ``provider`` and is skipped otherwise, with why; the fallbacks follow (see module doc)."""
    out, skipped = [], []
    for item in order:
        backend, p = split_item(item)
        if p is None or p == provider:
            out.append(backend)
        else:
            skipped.append((item, f"flash would serve this with {provider}" if provider else
                            "no flash provider serves this here"))
    return _with_fallback(out), tuple(skipped)


def _validate(table, where: str) -> dict:
    entries = table.get("entries") if isinstance(table, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f"{where}: expected a JSON object with an 'entries' object")
    version = table.get("version", 1)
    if version not in VERSIONS:
        raise ValueError(f"{where}: format version {version!r} is not one of {VERSIONS}")
    features = NUM_FEATURES if version >= KEYS_FEATURE_SINCE else NUM_FEATURES - 1
    for key, entry in entries.items():
        if len(key.split("|")) != features:
            raise ValueError(f"{where}: key {key!r} is not op|arch|dtype|head|kv"
                             + ("|keys" if features == NUM_FEATURES else "")
                             + f" (format version {version})")
        order = entry.get("order") if isinstance(entry, dict) else None
        if not order or not all(isinstance(b, str) and split_item(b)[0] for b in order):
            raise ValueError(f"{where}: entry {key!r} needs a non-empty 'order' list of names")
        for item in order:
            backend, provider = split_item(item)
            if provider is not None and (version < 2 or backend != "flash"):
                raise ValueError(f"{where}: entry {key!r} names {item!r}: only 'flash:<provider>'"
                                 f" items, and only in format version 2")
        runs = entry.get("runs", [])
        if not isinstance(runs, list) or not all(isinstance(r, dict) and r.get("order")
                                                 for r in runs):
            raise ValueError(f"{where}: entry {key!r}: 'runs' must be a list of objects with an "
                             f"'order'")
    return table


@functools.lru_cache(maxsize=4)
def load(path: str | None = None) -> dict:
    """The table at ``path`` (default: the committed one), validated; read once per path.
    Format versions 1 (plain backend names) and 2 (flash items may name their provider)."""
    target = Path(path) if path else TABLE_PATH
    if not target.exists():
        warnings.warn(f"attn_ops auto table {target.name} is missing; 'auto' uses the static "
                      f"default order", stacklevel=2)
        return {"entries": {}}
    with open(target, encoding="utf-8") as f:
        return upgraded(_validate(json.load(f), target.name))


def _table(table: dict | None) -> dict:
    if table is not None:
        return upgraded(table)
    return load(os.environ.get("ATTN_OPS_AUTO_TABLE") or None)


def entry_for(config: OpConfig, arch: str | None = None,
              table: dict | None = None) -> tuple[str, dict] | None:
    """``(key, entry)`` of the most specific key present for ``config``, or None (also off
    CUDA when ``arch`` is not given). ``table`` defaults to :func:`load`'s."""
    if arch is None:
        if config.device.type != "cuda":
            return None
        arch = arch_of(config.device)
    entries = _table(table)["entries"]
    for key in candidate_keys(features(config, arch)):
        if key in entries:
            return key, entries[key]
    return None


def flash_provider(config: OpConfig) -> str | None:
    """The provider id the flash backend would serve ``config`` with, or None (memoised there)."""
    from attn_ops.registry import get_backend_module  # the registry imports this module lazily
    try:
        module = get_backend_module("flash")
    except ImportError:
        return None
    ask = getattr(module, "provider_id", None)
    return ask(config) if ask is not None else None


def _names_provider(order) -> bool:
    return any(PROVIDER_SEP in item for item in order)


def order_for(config: OpConfig, arch: str | None = None, table: dict | None = None,
              provider: Callable[[OpConfig], str | None] = flash_provider
              ) -> tuple[str, ...] | None:
    """Backends to try for ``config``, fastest first, or None without data.

    ``arch`` defaults to that of ``config.device``; ``table`` to :func:`load`'s; ``provider``
    says which flash provider would serve ``config`` (asked only when the order names one).
    """
    found = entry_for(config, arch, table)
    if found is None:
        return None
    order = found[1]["order"]
    return resolve(order, provider(config) if _names_provider(order) else None)[0]


# ---------------------------------------------------------------------------------------------
# Why: the text of attn_ops.explain(config)["auto"]
# ---------------------------------------------------------------------------------------------

def runs_of(entry: dict, table: dict) -> list[dict]:
    """An entry's measured runs; a version-1 measured entry is one run on the table's device."""
    if "runs" in entry:
        return entry["runs"]
    if "median_us" in entry:
        return [{**entry, "device": table.get("device", "an unnamed GPU")}]
    return []


def _run_for(runs: list[dict], item: str, provider: str | None) -> dict | None:
    """The run that measured ``item``: the one with this provider's flash timing first."""
    holding = [r for r in runs if item in r.get("median_us", {})]
    for r in holding:
        if r.get("flash") == provider:
            return r
    return holding[-1] if holding else None


def why(config: OpConfig, picked: str, arch: str | None = None, table: dict | None = None,
        provider: Callable[[OpConfig], str | None] = flash_provider) -> str:
    """Why "auto" took backend ``picked`` for ``config``: what the table measured for it (and
    which flash provider), and the table items it skipped for this install."""
    table = _table(table)
    found = entry_for(config, arch, table)
    if found is None:
        return "no auto-table entry for this config: the registry's static order"
    key, entry = found
    order = entry["order"]
    active = provider(config) if _names_provider(order) else None
    _, skipped = resolve(order, active)
    item = next((i for i in order if split_item(i)[0] == picked
                 and split_item(i)[1] in (None, active)), None)
    if item is None:
        text = f"not measured first for {key}: tried after the table's backends"
    elif "wins" in entry:
        won = ", ".join(f"{b} {n}" for b, n in entry["wins"].items())
        text = f"wildcard entry {key} (keys won: {won})"
    else:
        run = _run_for(runs_of(entry, table), item, active)
        text = _measured(item, run, key) if run else f"listed by {key}"
    notes = [f"{i} skipped: {reason}" for i, reason in skipped]
    return "; ".join([text] + notes)


def _measured(item: str, run: dict, key: str) -> str:
    times, order = run["median_us"], [i for i in run["order"] if i in run["median_us"]]
    backend, provider = split_item(item)
    who = provider or backend
    rest = order[order.index(item) + 1:] if item in order else []
    on = f"on {run.get('device', 'an unnamed GPU')} for this key ({key})"
    if rest:
        return f"{who} measured {times[rest[0]] / times[item]:.2f}x faster than {rest[0]} {on}"
    if len(order) > 1:
        return f"{who} measured after {', '.join(order[:-1])} {on}"
    return f"{who} the only backend measured {on}"
