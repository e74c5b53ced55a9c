"""Building the auto table from benchmark rows (benchmarks/auto_table_builder.py)."""

import json

import pytest

from attn_ops import auto_table
from benchmarks import auto_table_builder


def _row(key, workload, backend, us):
    return {"key": key, "workload": workload, "backend": backend, "median_us": us}


K1, K2, K3 = ("decode|sm90|bf16|d128|bs16", "decode|sm90|bf16|d128|bs256",
              "prefill|sm90|bf16|d128|dense")
ROWS = [
    _row(K1, "small", "triton", 10.0), _row(K1, "small", "flash", 20.0),
    _row(K1, "large", "triton", 100.0), _row(K1, "large", "flash", 60.0),  # geomean: t 31.6 < 34.6
    _row(K2, "small", "triton", 10.0), _row(K2, "small", "flash", 10.0),  # exact tie
    _row(K3, "a", "flash", 5.0), _row(K3, "a", "triton", 4.0),
    _row(K3, "b", "flash", 5.0), _row(K3, "b", "triton", ""),  # triton failed on b: left out
]


def test_build_ranks_by_geomean_breaks_ties_and_drops_incomplete():
    entries = auto_table_builder.build_table(ROWS, "measured")["entries"]
    assert entries[K1]["order"] == ["triton", "flash"]
    assert entries[K1]["speedup"] == pytest.approx((20 * 60) ** 0.5 / 1000 ** 0.5, abs=1e-3)
    assert entries[K2]["order"] == list(auto_table_builder.TIE_ORDER[:2])  # tie: the fixed order
    assert entries[K3]["order"] == ["flash"] and "speedup" not in entries[K3]
    assert entries[K3]["median_us"] == {"flash": 5.0}


def test_build_adds_wildcard_defaults_by_wins_and_is_deterministic():
    table = auto_table_builder.build_table(ROWS, "measured", meta={"device": "H100"})
    entries = table["entries"]
    assert entries["decode|sm90|bf16|d128|*"]["order"] == ["triton", "flash"]  # 2 wins to 0
    assert entries["decode|sm90|*|*|*"]["wins"] == {"triton": 2, "flash": 0}
    assert entries["prefill|*|*|*|*"]["order"] == ["flash"]
    again = auto_table_builder.build_table(list(reversed(ROWS)), "measured", meta={"device": "H100"})
    assert json.dumps(table, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert table["device"] == "H100" and table["source"] == "measured"


def test_build_keeps_other_archs_and_drops_provisional_entries():
    previous = {"entries": {
        "decode|sm80|bf16|d128|bs16": {"order": ["flash", "triton"],
                                       "median_us": {"flash": 1.0, "triton": 2.0}},
        "decode|sm90|bf16|d128|bs16": {"order": ["flash"], "median_us": {"flash": 1.0}},
        "prefill|sm90|*|*|*": {"order": ["flash", "triton"], "why": "provisional"}}}
    entries = auto_table_builder.build_table(ROWS, "measured", previous=previous)["entries"]
    assert entries["decode|sm80|bf16|d128|bs16"]["order"] == ["flash", "triton"]  # kept
    assert entries[K1]["order"] == ["triton", "flash"]  # re-measured arch replaced
    assert "why" not in entries["prefill|sm90|*|*|*"]  # recomputed from measurements
    assert entries["decode|*|*|*|*"]["wins"] == {"triton": 2, "flash": 1}


def test_dumps_round_trips_one_entry_per_line_and_loads(tmp_path):
    table = auto_table_builder.build_table(ROWS, "measured", meta={"device": "H100"})
    text = auto_table_builder.dumps(table)
    assert json.loads(text) == table
    (tmp_path / "table.json").write_text(text)
    assert auto_table.load(str(tmp_path / "table.json")) == table  # the loader accepts it
    assert text.count("\n") == len(table["entries"]) + 7  # braces, 3 meta lines, entries
