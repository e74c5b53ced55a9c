"""The measured backend order that "auto" follows on CUDA, per op and static configuration.

The data is ``auto_table.json`` beside this file (or the file named by ``ATTN_OPS_AUTO_TABLE``),
written by ``benchmarks/bench_auto_table.py`` on a GPU and committed. Its keys are
``op|arch|dtype|head|kv``:

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
import math
import os
import warnings
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).with_name("auto_table.json")
# Tried after the measured order, and breaks exact ties in it (the registry's static CUDA order).
FALLBACK = ("triton", "flash")
TIE_ORDER = ("triton", "flash", "reference")
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


def kv_bucket(op: str, config: dict) -> str:
    if op == "prefill" and not config.get("paged"):
        return "dense"
    bucket, block_size = 16, config["block_size"]
    while bucket < block_size and bucket < MAX_BLOCK_BUCKET:
        bucket *= 2
    return f"bs{bucket}"


def features(op: str, config: dict, arch: str) -> tuple[str, ...]:
    """``(op, arch, dtype, head, kv)`` for an op's config (see :mod:`attn_ops.ops`)."""
    dtype = DTYPES.get(config["dtype"], str(config["dtype"]).replace("torch.", ""))
    return (op, arch, dtype, head_bucket(config["head_dim"]), kv_bucket(op, config))


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


def order_for(op: str, config: dict, arch: str | None = None,
              table: dict | None = None) -> tuple[str, ...] | None:
    """Backends to try for ``op`` with ``config``, fastest first, or None without data.

    ``arch`` defaults to that of ``config['device']``; ``table`` to :func:`load`'s.
    """
    if arch is None:
        if config["device"].type != "cuda":
            return None
        arch = arch_of(config["device"])
    if table is None:
        table = load(os.environ.get("ATTN_OPS_AUTO_TABLE") or None)
    entries = table["entries"]
    for key in candidate_keys(features(op, config, arch)):
        if key in entries:
            return _with_fallback(entries[key]["order"])
    return None


# ---------------------------------------------------------------------------------------------
# Building the table from benchmark rows (benchmarks/bench_auto_table.py)
# ---------------------------------------------------------------------------------------------

def _tie_rank(backend: str) -> tuple:
    return (TIE_ORDER.index(backend) if backend in TIE_ORDER else len(TIE_ORDER), backend)


def rank_key(times: dict[str, dict[str, float]]) -> list[tuple[str, float]]:
    """Rank backends for one key from ``{workload: {backend: median_us}}``.

    A backend's score is the geometric mean of its medians over the key's workloads (so no one
    workload dominates by size); a backend missing any workload, or with a non-finite time, is
    left out. Sorted by score, exact ties by :data:`TIE_ORDER`.
    """
    workloads = sorted(times)
    backends = {b for per in times.values() for b in per}
    scores = {}
    for b in backends:
        ts = [times[w].get(b) for w in workloads]
        if all(t is not None and math.isfinite(t) and t > 0 for t in ts):
            scores[b] = math.exp(sum(math.log(t) for t in ts) / len(ts))
    return sorted(scores.items(), key=lambda item: (item[1], _tie_rank(item[0])))


def _measured_entry(ranked: list[tuple[str, float]]) -> dict:
    entry = {"order": [b for b, _ in ranked],
             "median_us": {b: round(t, 3) for b, t in ranked}}
    if len(ranked) > 1:
        entry["speedup"] = round(ranked[1][1] / ranked[0][1], 3)
    return entry


def _defaults(measured: dict) -> dict:
    """Wildcard entries: at each relaxation level, backends ordered by keys won (ties fixed)."""
    out = {}
    for level in range(1, NUM_FEATURES):
        groups: dict[str, list[dict]] = {}
        for key in sorted(measured):
            parts = tuple(key.split("|"))
            groups.setdefault(make_key(relaxed(parts, level)), []).append(measured[key])
        for gkey, group in groups.items():
            wins: dict[str, int] = {}
            for entry in group:
                for b in entry["order"]:
                    wins.setdefault(b, 0)
                wins[entry["order"][0]] += 1
            order = sorted(wins, key=lambda b: (-wins[b], _tie_rank(b)))
            out[gkey] = {"order": order, "wins": {b: wins[b] for b in order}}
    return out


def build_table(rows, source: str, meta: dict | None = None,
                previous: dict | None = None) -> dict:
    """The table for benchmark ``rows`` (dicts with key, workload, backend, median_us).

    Measured entries of ``previous`` for archs not in ``rows`` are kept (one table serves
    several GPU kinds); its provisional entries (no ``median_us``) are dropped. Wildcard entries
    are recomputed from all measured ones. Same rows in, same table out.
    """
    times: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        t = row.get("median_us")
        per = times.setdefault(row["key"], {}).setdefault(row["workload"], {})
        per[row["backend"]] = float(t) if t not in (None, "") else math.nan
    measured = {}
    archs = {key.split("|")[1] for key in times}
    for key, entry in ((previous or {}).get("entries") or {}).items():
        if "median_us" in entry and key.split("|")[1] not in archs:
            measured[key] = entry
    for key in sorted(times):
        ranked = rank_key(times[key])
        if ranked:
            measured[key] = _measured_entry(ranked)
    entries = dict(sorted({**measured, **_defaults(measured)}.items()))
    return {"version": 1, "source": source, **(meta or {}), "entries": entries}


def dumps(table: dict) -> str:
    """The table as JSON text, one entry per line, keys sorted: small, stable diffs."""
    head = {k: v for k, v in sorted(table.items()) if k != "entries"}
    lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    entries = sorted(table["entries"].items())
    lines.append('  "entries": {')
    lines += [f"    {json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
              + ("," if i < len(entries) - 1 else "") for i, (k, v) in enumerate(entries)]
    return "\n".join(lines + ["  }", "}"]) + "\n"
