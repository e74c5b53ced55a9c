"""Building the auto table from benchmark rows (benchmarks/auto_table_builder.py)."""

import json

import pytest

from attn_ops import auto_table
from benchmarks import auto_table_builder


def _row(key, workload, backend, us):
    return {"key": key, "workload": workload, "backend": backend, "median_us": us}


K1, K2, K3 = ("decode|sm90|bf16|d128|bs16|any", "decode|sm90|bf16|d128|bs256|any",
              "prefill|sm90|bf16|d128|dense|short")
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
    (run,) = entries[K1]["runs"]
    assert run["speedup"] == pytest.approx((20 * 60) ** 0.5 / 1000 ** 0.5, abs=1e-3)
    assert entries[K2]["order"] == list(auto_table_builder.TIE_ORDER[:2])  # tie: the fixed order
    (run,) = entries[K3]["runs"]
    assert entries[K3]["order"] == ["flash"] and "speedup" not in run
    assert run["median_us"] == {"flash": 5.0} and "flash" not in run  # no provider named


def test_build_adds_wildcard_defaults_by_wins_and_is_deterministic():
    table = auto_table_builder.build_table(ROWS, "measured", meta={"device": "H100"})
    entries = table["entries"]
    assert entries["decode|sm90|bf16|d128|*|*"]["order"] == ["triton", "flash"]  # 2 wins to 0
    assert entries["decode|sm90|*|*|*|*"]["wins"] == {"triton": 2, "flash": 0}
    assert entries["prefill|*|*|*|*|*"]["order"] == ["flash"]
    again = auto_table_builder.build_table(list(reversed(ROWS)), "measured", meta={"device": "H100"})
    assert json.dumps(table, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert table["device"] == "H100" and table["source"] == "measured"
    assert table["version"] == 3
    assert {r["device"] for e in entries.values() for r in e.get("runs", [])} == {"H100"}


def test_build_keeps_other_archs_and_drops_provisional_entries():
    previous = {"entries": {
        "decode|sm80|bf16|d128|bs16": {"order": ["flash", "triton"],
                                       "median_us": {"flash": 1.0, "triton": 2.0}},
        "decode|sm90|bf16|d128|bs16": {"order": ["flash"], "median_us": {"flash": 1.0}},
        "prefill|sm90|*|*|*": {"order": ["flash", "triton"], "why": "provisional"}}}
    entries = auto_table_builder.build_table(ROWS, "measured", previous=previous)["entries"]
    # (a format-1 table: its five-feature keys read with the keys feature appended)
    assert entries["decode|sm80|bf16|d128|bs16|any"]["order"] == ["flash", "triton"]  # kept
    assert entries[K1]["order"] == ["triton", "flash"]  # re-measured arch replaced
    assert "why" not in entries["prefill|sm90|*|*|*|*"]  # recomputed from measurements
    assert entries["decode|*|*|*|*|*"]["wins"] == {"triton": 2, "flash": 1}


def test_dumps_round_trips_one_entry_per_line_and_loads(tmp_path):
    table = auto_table_builder.build_table(ROWS, "measured", meta={"device": "H100"})
    text = auto_table_builder.dumps(table)
    assert json.loads(text) == table
    (tmp_path / "table.json").write_text(text)
    assert auto_table.load(str(tmp_path / "table.json")) == table  # the loader accepts it
    assert text.count("\n") == len(table["entries"]) + 7  # braces, 3 meta lines, entries


# ---------------------------------------------------------------------------------------------
# Flash providers (format version 2)
# ---------------------------------------------------------------------------------------------

def _prow(key, workload, backend, us, impl=None):
    return {**_row(key, workload, backend, us), "impl": impl or ""}


# Dense prefill on two installs: FA3 (fa3-fwd) beats Triton on the H200 (the quick run's
# geometric means: 216.8 vs 351.2 us); PyTorch's FA2 loses to it on the H100 (545.8 vs 330.0).
FA3_ROWS = [_prow(K3, "a", "triton", 441.4), _prow(K3, "a", "flash", 267.0, "fa3_fwd"),
            _prow(K3, "b", "triton", 279.4), _prow(K3, "b", "flash", 176.0, "fa3_fwd")]
ATEN_ROWS = [_prow(K3, "a", "triton", 330.0), _prow(K3, "a", "flash", 545.8, "aten")]


def test_flash_timings_name_their_provider_and_older_labels_map():
    entry = auto_table_builder.build_table(FA3_ROWS, "h200", {"device": "H200"})["entries"][K3]
    assert entry["order"] == ["flash:fa3_fwd", "triton"]
    (run,) = entry["runs"]
    assert run["flash"] == "fa3_fwd" and run["device"] == "H200" and run["source"] == "h200"
    assert run["speedup"] == pytest.approx(351.2 / 216.8, abs=2e-3)
    old_label = "FA3 forward-only (fa3_fwd_interface unknown version)"  # the H200 CSV's impl
    assert auto_table_builder.provider_id(old_label) == "fa3_fwd"
    assert auto_table_builder.provider_id("FA2 inside PyTorch (aten._flash_attention_forward, "
                                          "torch 2.11.0+cu130)") == "aten"
    assert auto_table_builder.provider_id("") is None
    assert auto_table_builder.provider_id("aten") == "aten"


def test_merge_keeps_the_runs_of_other_providers_and_replaces_the_same_one():
    aten = auto_table_builder.build_table(ATEN_ROWS, "h100", {"device": "H100", "date": "1"})
    both = auto_table_builder.build_table(FA3_ROWS, "h200", {"device": "H200", "date": "2"},
                                          previous=aten)
    entry = both["entries"][K3]
    assert [r["flash"] for r in entry["runs"]] == ["aten", "fa3_fwd"]  # the H100's run kept
    assert entry["order"] == ["flash:fa3_fwd", "triton", "flash:aten"]
    # Each install sees the order its provider measured.
    assert auto_table.resolve(entry["order"], "fa3_fwd")[0] == ("flash", "triton")
    assert auto_table.resolve(entry["order"], "aten")[0] == ("triton", "flash")
    # A re-run with the same provider replaces its run only.
    faster = [{**r, "median_us": 100.0} if r["backend"] == "triton" else r for r in ATEN_ROWS]
    again = auto_table_builder.build_table(faster, "h100b", {"device": "H100", "date": "3"},
                                           previous=both)["entries"][K3]
    assert [(r["flash"], r["source"]) for r in again["runs"]] == [("aten", "h100b"),
                                                                   ("fa3_fwd", "h200")]
    # Keys the new rows do not measure keep their entries (a --quick run keeps the full grid).
    other = auto_table_builder.build_table(ROWS[:6], "x", previous=both)["entries"]
    assert other[K3] == entry


def test_version_1_tables_migrate_with_their_one_flash_implementation():
    old = "prefill|sm90|bf16|d128|dense"  # five features: read as old + "|*"
    v1 = {"version": 1, "device": "H100", "source": "old",
          "flash_impls": ["FA2 inside PyTorch (aten._flash_attention_forward, torch 2.11.0)"],
          "entries": {old: {"order": ["triton", "flash"], "speedup": 1.654,
                            "median_us": {"flash": 545.812, "triton": 329.992}},
                      "prefill|*|*|*|*": {"order": ["triton", "flash"], "wins": {"triton": 1}}}}
    rows = [dict(r, key=old) for r in FA3_ROWS]  # an older CSV's rows, five features too
    entries = auto_table_builder.build_table(rows, "h200", {"device": "H200"},
                                             previous=v1)["entries"]
    aten = entries[old + "|*"]["runs"][0]
    assert aten == {"order": ["triton", "flash:aten"], "flash": "aten", "device": "H100",
                    "source": "old", "speedup": 1.654,
                    "median_us": {"flash:aten": 545.812, "triton": 329.992}}
    assert entries["prefill|*|*|*|*|*"]["wins"] == {"triton": 1, "flash:fa3_fwd": 1,
                                                    "flash:aten": 0}
    v1["flash_impls"].append("FA3 (flash_attn_interface 3.0)")  # which one? keep it plain
    entries = auto_table_builder.build_table([], "none", previous=v1)["entries"]
    assert entries[old + "|*"]["order"] == ["triton", "flash"]


def test_merge_orders_puts_each_provider_where_its_run_measured_it():
    runs = [{"order": ["triton", "reference", "flash:aten"], "date": "1"},
            {"order": ["flash:fa3", "triton", "reference"], "date": "2"},
            {"order": ["triton", "flash:fa2", "reference"], "date": "3"},
            {"order": ["triton", "flash:fa3_fwd", "reference"], "date": "0"}]
    merged = auto_table_builder.merge_orders(runs)
    assert merged == ["flash:fa3", "triton", "flash:fa2", "flash:fa3_fwd", "reference",
                      "flash:aten"]
    for run in runs:  # every provider's install sees its own run's order
        provider = auto_table.split_item(next(i for i in run["order"] if ":" in i))[1]
        assert auto_table.resolve(merged, provider)[0][:3] == tuple(
            auto_table.split_item(i)[0] for i in run["order"])


@pytest.fixture
def fresh_load():
    auto_table.load.cache_clear()
    yield
    auto_table.load.cache_clear()  # never leave a test table in the loader's cache


def test_the_script_rebuilds_from_a_csv_through_the_builder(tmp_path, monkeypatch, fresh_load):
    csv_path = tmp_path / "run.csv"
    csv_path.write_text("key,workload,backend,median_us,impl\n" + "".join(
        f"{r['key']},{r['workload']},{r['backend']},{r['median_us']},{r['impl']}\n"
        for r in FA3_ROWS + [_prow(K1, "a", "triton", 1.0)]))
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"version": 1, "entries": {}}))
    monkeypatch.setattr(auto_table, "TABLE_PATH", empty)
    out = tmp_path / "out.json"
    auto_table_builder.main([str(csv_path), "--device", "H200", "--date", "2", "--keys", K3,
                             "--note", "triton before the fix", "--out", str(out)])
    auto_table.load.cache_clear()
    table = auto_table.load(str(out))
    assert set(table["entries"]) == {K3} | {auto_table.make_key(auto_table.relaxed(
        tuple(K3.split("|")), n)) for n in range(1, auto_table.NUM_FEATURES)}
    assert table["entries"][K3]["runs"][0]["source"].endswith("; triton before the fix")
    assert table["flash_providers"] == {"fa3_fwd": "fa3_fwd"}


def test_a_partial_run_keeps_the_labels_of_the_providers_whose_runs_it_keeps():
    # A --quick run (bf16 only, fa3-fwd installed) keeps the fp16 key's run measured on aten:
    # the table still names aten's label, takes fa3_fwd's new one, drops a provider no run uses.
    fp16 = "prefill|sm90|fp16|d128|dense|short"
    before = auto_table_builder.build_table(
        [dict(r, key=fp16) for r in ATEN_ROWS], "first", {"flash_providers": {"aten": "FA2"}})
    before["flash_providers"] = {"aten": "FA2", "fa3_fwd": "old", "gone": "unused"}
    table = auto_table_builder.build_table(
        FA3_ROWS, "quick", {"flash_providers": {"fa3_fwd": "FA3 new"}}, previous=before)
    assert {r["flash"] for r in table["entries"][fp16]["runs"]} == {"aten"}
    assert table["flash_providers"] == {"aten": "FA2", "fa3_fwd": "FA3 new"}
