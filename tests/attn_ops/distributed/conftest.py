"""Fixtures of the distributed tests: a one-rank gloo group in this process, and torchrun.

The one-rank group exercises the DTensor rules and the context-parallel plumbing cheaply; the
two-rank runs go through ``torchrun`` in a fresh process (as a user runs the examples).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def single_rank_group(tmp_path_factory):
    """A default gloo process group of one rank, destroyed after the module."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture
def torchrun(tmp_path):
    """``torchrun(example, nproc, *args)``: run ``examples/<example>`` on ``nproc`` CPU ranks
    (gloo), assert exit 0, return what rank 0 wrote with ``--json``."""
    def run(example: str, nproc: int, *args: str):
        report = tmp_path / "report.json"
        env = {**os.environ, "ATTN_OPS_CHECK": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", str(ROOT / "examples" / example),
               "--json", str(report), *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{example} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
        return json.loads(report.read_text())
    return run
