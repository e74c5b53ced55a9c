"""Turn benchmark timings into the "auto" table that attn_ops/auto_table.py loads.

Used by ``bench_auto_table.py`` only; the library never builds a table, it reads the committed
JSON. Rows are dicts with ``key`` (``op|arch|dtype|head|kv``), ``workload``, ``backend`` and
``median_us``. Per key, backends are ranked by the geometric mean of their workload medians;
wildcard entries (``op|arch|dtype|head|*`` ... ``op|*|*|*|*``) order backends by keys won, for
configurations the grid did not measure. Same rows in, same table (and same text) out.
"""

from __future__ import annotations

import json
import math

from attn_ops.auto_table import NUM_FEATURES, make_key, relaxed

# Breaks exact ties in a measured ranking: the registry's static CUDA order, then the reference.
TIE_ORDER = ("triton", "flash", "reference")


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
