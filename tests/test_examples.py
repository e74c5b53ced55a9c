"""The examples run as a user runs them (a fresh interpreter) and pass their own checks.

Each example asserts its own correctness and exits nonzero on a failure; with ``--json`` it also
writes the values it checked, which these tests assert on (so a silently skipped check shows).
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, tmp_path, *args: str) -> dict:
    report = tmp_path / f"{name}.json"
    env = {**os.environ, "ATTN_OPS_CHECK": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--json", str(report), *args],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(report.read_text())


def test_explicit_ops(tmp_path):
    r = run_example("explicit_ops.py", tmp_path)
    assert r["ok"] and r["max_err"] <= r["tol"] == 1e-4
    assert r["calls"] == {"store_kvcache": 15, "prefill": 4, "decode": 11}
    assert r["final_lengths"] == {"a": 23, "c": 32, "d": 25, "e": 32}
    assert r["blocks_leaked"] == 0


def test_compile_model(tmp_path):
    r = run_example("compile_model.py", tmp_path)
    assert r["ok"]
    # the transformers half runs where transformers is installed (the test extra has it)
    assert len(r["models"]) == (2 if importlib.util.find_spec("transformers") else 1)
    for part in r["models"].values():
        assert part["prefill_calls"] == part["expected"] == 2 and part["sdpa_calls"] == 0
        assert part["max_err"] <= part["tol"] == 1e-4
