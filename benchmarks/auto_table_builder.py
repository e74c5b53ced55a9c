"""Turn benchmark timings into the "auto" table that attn_ops/auto_table.py loads.

Used by ``bench_auto_table.py``, and as a script to rebuild the table from a committed CSV of
that benchmark (below); the library never builds a table, it reads the committed JSON. Rows are
dicts with ``key`` (``op|arch|dtype|head|kv|keys``; an older CSV's five features are read as
:func:`attn_ops.auto_table.upgrade_key` says), ``workload``, ``backend``, ``median_us`` and, for
flash, ``impl``: the provider id that served the timing ("fa3_fwd", "aten", ...; older CSVs hold
the provider's label, mapped by :func:`provider_id`). A flash timing becomes the item
``flash:<provider>``, so one key can hold the rows of several providers (format version 2).

Per key, one run of the benchmark gives one *run*: its items ranked by the geometric mean of
their workload medians, exact ties broken by :data:`TIE_ORDER`. Merging with the previous table,
a key keeps the runs of other flash providers (and keys the rows do not measure keep their
entries, as other GPU kinds' do); a new run replaces the previous one with the same flash
provider (or with none). The entry's ``order`` merges its runs (:func:`merge_orders`). Wildcard
entries (``op|arch|dtype|head|*`` ... ``op|*|*|*|*``) order items by runs won, for
configurations the grid did not measure. Same rows in, same table (and same text) out.

Rebuild from a CSV (e.g. one key of a quick run)::

    python benchmarks/auto_table_builder.py benchmarks/results/auto_table_h200_quick.csv \\
        --device "NVIDIA H200" --date 2026-11-30 --keys 'prefill|sm90|bf16|d128|dense' \\
        --note "..." --install
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from attn_ops import auto_table
from attn_ops.auto_table import NUM_FEATURES, PROVIDER_SEP, make_key, relaxed, split_item
from attn_ops.backends.flash.providers import PROVIDER_ORDER

VERSION = 3
# What each run of an entry records about where it was measured (from the build's meta).
STAMP = ("device", "date", "torch", "triton")
# Breaks exact ties in a measured ranking: the registry's static CUDA order, then the reference.
TIE_ORDER = ("triton", "flash", "reference")
# The provider labels older benchmark CSVs wrote in their impl column (Provider.label prefixes).
LEGACY_LABELS = (("FA3 forward-only", "fa3_fwd"), ("FA3 (", "fa3"),
                 ("FA2 inside PyTorch", "aten"), ("FA2 (flash_attn", "fa2"))


def provider_id(impl: str | None) -> str | None:
    """The provider id for an ``impl`` cell: an id as is, an older CSV's label mapped, else None."""
    impl = (impl or "").strip()
    if impl in PROVIDER_ORDER:
        return impl
    return next((pid for prefix, pid in LEGACY_LABELS if impl.startswith(prefix)), None)


def item_of(row: dict) -> str:
    """``flash:<provider>`` for a flash row whose provider is known, else the backend name."""
    provider = provider_id(row.get("impl")) if row["backend"] == "flash" else None
    return f"flash{PROVIDER_SEP}{provider}" if provider else row["backend"]


def _tie_rank(item: str) -> tuple:
    backend = split_item(item)[0]
    return (TIE_ORDER.index(backend) if backend in TIE_ORDER else len(TIE_ORDER), item)


def rank_key(times: dict[str, dict[str, float]]) -> list[tuple[str, float]]:
    """Rank items for one key from ``{workload: {item: median_us}}``.

    An item's score is the geometric mean of its medians over the key's workloads (so no one
    workload dominates by size); an item missing any workload, or with a non-finite time, is
    left out. Sorted by score, exact ties by :data:`TIE_ORDER`.
    """
    workloads = sorted(times)
    items = {b for per in times.values() for b in per}
    scores = {}
    for b in items:
        ts = [times[w].get(b) for w in workloads]
        if all(t is not None and math.isfinite(t) and t > 0 for t in ts):
            scores[b] = math.exp(sum(math.log(t) for t in ts) / len(ts))
    return sorted(scores.items(), key=lambda item: (item[1], _tie_rank(item[0])))


def _flash_of(order) -> str | None:
    return next((p for p in (split_item(i)[1] for i in order) if p), None)


def _run(ranked: list[tuple[str, float]], stamp: dict) -> dict:
    run = {"order": [b for b, _ in ranked], "median_us": {b: round(t, 3) for b, t in ranked},
           **stamp}
    if len(ranked) > 1:
        run["speedup"] = round(ranked[1][1] / ranked[0][1], 3)
    flash = _flash_of(run["order"])
    if flash:
        run["flash"] = flash
    return run


def merge_orders(runs: list[dict]) -> list[str]:
    """One order for a key's runs. The items that name no provider keep the order of the latest
    run (by date) that has them; each ``flash:<p>`` goes just before the first of them that it
    beat in its own run (last if it beat none). At most one ``flash:<p>`` resolves on a given
    install, so every install sees the order its provider's run measured."""
    latest_first = sorted(runs, key=lambda r: (r.get("date", ""), r.get("flash") or ""),
                          reverse=True)
    base: list[str] = []
    for run in latest_first:
        base += [i for i in run["order"] if not split_item(i)[1] and i not in base]
    before: dict[int, list[str]] = {}
    for run in runs:
        order = run["order"]
        for n, item in enumerate(order):
            if split_item(item)[1]:
                after = [i for i in order[n + 1:] if i in base]
                slot = base.index(after[0]) if after else len(base)
                before.setdefault(slot, []).append(item)
    merged = []
    for slot in range(len(base) + 1):
        merged += sorted(set(before.get(slot, [])))
        merged += base[slot:slot + 1]
    return merged


def _legacy_runs(entry: dict, previous: dict) -> list[dict]:
    """A version-1 measured entry as one run; its plain ``flash`` named by the provider when the
    old table lists exactly one flash implementation (flash_impls)."""
    impls = {provider_id(i) for i in previous.get("flash_impls", [])}
    flash = impls.pop() if len(impls) == 1 and None not in impls else None
    rename = (lambda i: f"flash{PROVIDER_SEP}{flash}" if i == "flash" and flash else i)
    run = {"order": [rename(i) for i in entry["order"]],
           "median_us": {rename(i): t for i, t in entry["median_us"].items()},
           **{k: previous[k] for k in STAMP + ("source",) if k in previous}}
    if "speedup" in entry:
        run["speedup"] = entry["speedup"]
    if _flash_of(run["order"]):
        run["flash"] = _flash_of(run["order"])
    return [run]


def _previous_runs(previous: dict | None) -> dict[str, list[dict]]:
    out = {}
    for key, entry in ((previous or {}).get("entries") or {}).items():
        if "runs" in entry:
            out[key] = list(entry["runs"])
        elif "median_us" in entry:  # version 1; its wildcard entries are recomputed
            out[key] = _legacy_runs(entry, previous)
    return out


def _defaults(measured: dict) -> dict:
    """Wildcard entries: at each relaxation level, items ordered by runs won (ties fixed)."""
    out = {}
    for level in range(1, NUM_FEATURES):
        groups: dict[str, list[dict]] = {}
        for key in sorted(measured):
            parts = tuple(key.split("|"))
            groups.setdefault(make_key(relaxed(parts, level)), []).extend(measured[key]["runs"])
        for gkey, group in groups.items():
            wins: dict[str, int] = {}
            for run in group:
                for b in run["order"]:
                    wins.setdefault(b, 0)
                wins[run["order"][0]] += 1
            order = sorted(wins, key=lambda b: (-wins[b], _tie_rank(b)))
            out[gkey] = {"order": order, "wins": {b: wins[b] for b in order}}
    return out


def build_table(rows, source: str, meta: dict | None = None,
                previous: dict | None = None) -> dict:
    """The table for benchmark ``rows`` (dicts with key, workload, backend, median_us, impl).

    Each key measured gets a run stamped with ``source`` and ``meta``'s device and date; the
    measured entries of ``previous`` (version 1, 2 or 3) are merged in as the module doc says; its
    provisional and wildcard entries are dropped and the wildcards recomputed.
    """
    meta = meta or {}
    previous = auto_table.upgraded(previous) if previous else previous
    stamp = {"source": source, **{k: meta[k] for k in STAMP if k in meta}}
    times: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        t = row.get("median_us")
        key = auto_table.upgrade_key(row["key"])  # an older CSV's five features
        per = times.setdefault(key, {}).setdefault(row["workload"], {})
        per[item_of(row)] = float(t) if t not in (None, "") else math.nan
    runs = _previous_runs(previous)
    for key in sorted(times):
        ranked = rank_key(times[key])
        if ranked:
            run = _run(ranked, stamp)
            kept = [r for r in runs.get(key, []) if r.get("flash") != run.get("flash")]
            runs[key] = sorted(kept + [run], key=lambda r: r.get("flash") or "")
    measured = {key: {"order": merge_orders(rs), "runs": rs} for key, rs in runs.items()}
    # A measured key wins over a wildcard of the same name: a format-2 prefill entry, measured
    # over prompts of any length, reads as op|...|kv|* (auto_table.upgrade_key).
    entries = dict(sorted({**_defaults(measured), **measured}.items()))
    meta = dict(meta)
    if "flash_providers" in meta:  # this run's labels, and the kept runs' from ``previous``
        used = {r["flash"] for rs in runs.values() for r in rs if r.get("flash")}
        known = {**((previous or {}).get("flash_providers") or {}), **meta["flash_providers"]}
        meta["flash_providers"] = {p: known[p] for p in sorted(used) if p in known}
    return {"version": VERSION, "source": source, **meta, "entries": entries}


def dumps(table: dict) -> str:
    """The table as JSON text, one entry per line, keys sorted: small, stable diffs."""
    head = {k: v for k, v in sorted(table.items()) if k != "entries"}
    lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True)},"
                     for k, v in head.items()]
    entries = sorted(table["entries"].items())
    lines.append('  "entries": {')
    lines += [f"    {json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
              + ("," if i < len(entries) - 1 else "") for i, (k, v) in enumerate(entries)]
    return "\n".join(lines + ["  }", "}"]) + "\n"


def providers_of(rows) -> dict[str, str]:
    """``{provider id: label}`` of the flash rows (the label column, or an older CSV's impl)."""
    out = {}
    for row in rows:
        pid = provider_id(row.get("impl")) if row.get("backend") == "flash" else None
        if pid:
            out[pid] = row.get("impl_label") or row.get("impl")
    return dict(sorted(out.items()))


def read_csv(path: Path, keys: list[str] | None = None) -> list[dict]:
    """The timed rows of a ``bench_auto_table.py`` CSV (only ``keys`` when given)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [{**r, "key": auto_table.upgrade_key(r["key"])} for r in csv.DictReader(f)
                if r.get("median_us") not in (None, "")]
    keys = keys and [auto_table.upgrade_key(k) for k in keys]
    return [r for r in rows if not keys or r["key"] in keys]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Rebuild the auto table from a bench_auto_table CSV, "
                                            "merged into the committed table.")
    p.add_argument("csv", type=Path)
    p.add_argument("--device", required=True, help="the GPU the CSV was measured on")
    p.add_argument("--date", required=True)
    p.add_argument("--torch", help="the torch version it ran with")
    p.add_argument("--triton", help="the triton version it ran with")
    p.add_argument("--keys", nargs="*", help="only these keys of the CSV")
    p.add_argument("--note", default="", help="appended to the runs' source")
    p.add_argument("--out", type=Path, help="write here (default: print)")
    p.add_argument("--install", action="store_true", help="rewrite attn_ops/auto_table.json")
    args = p.parse_args(argv)
    previous = auto_table.load()
    rows = read_csv(args.csv, args.keys)
    meta = {k: getattr(args, k) for k in STAMP if getattr(args, k)}
    meta["flash_providers"] = providers_of(rows)
    source = f"measured with benchmarks/bench_auto_table.py on {args.device} ({args.csv.name})"
    table = build_table(rows, source + (f"; {args.note}" if args.note else ""), meta, previous)
    text = dumps(table)
    if args.out:
        args.out.write_text(text)
    if args.install:
        auto_table.TABLE_PATH.write_text(text)
    if not (args.out or args.install):
        print(text, end="")


if __name__ == "__main__":
    main()
