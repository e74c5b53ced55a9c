"""The passes' uuid() covers what their decisions read, so a warm FX graph cache never serves a
stale substitution decision (issue 15): the backends' supports() sources, the auto table in
force, the environment and the installed kernel packages."""

import json
import types
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import attn_ops
from attn_ops import auto_table, registry
from attn_ops.backends import reference
from graph_passes.passes import base
from graph_passes.passes.handwritten_attention import HandwrittenAttentionPass
from tests.support.attention_models import HandAttention
from tests.support.helpers import TOLERANCES, assert_close

pytestmark = pytest.mark.usefixtures("fresh_compile")


def _table(path: Path, order: list[str]) -> str:
    path.write_text(json.dumps({"entries": {"prefill|cpu|*|*|*": {"order": order}}}))
    return str(path)


def test_source_files_cover_every_backend_and_the_auto_table():
    files = {Path(f).relative_to(Path(attn_ops.__file__).parents[1]).as_posix()
             for f in base.source_files()}
    backends = Path(attn_ops.__file__).parent / "backends"
    for module in backends.rglob("*.py"):
        assert module.relative_to(backends.parents[1]).as_posix() in files
    assert {"attn_ops/auto_table.py", "attn_ops/contract.py", "attn_ops/registry.py"} <= files


def test_uuid_follows_the_table_and_the_environment(tmp_path, monkeypatch):
    p = HandwrittenAttentionPass()
    monkeypatch.setenv("ATTN_OPS_AUTO_TABLE", _table(tmp_path / "a.json", ["sdpa"]))
    first = p.uuid()
    assert p.uuid() == first
    monkeypatch.setenv("ATTN_OPS_AUTO_TABLE", _table(tmp_path / "b.json", ["spy"]))
    assert p.uuid() != first
    monkeypatch.setenv("ATTN_OPS_AUTO_TABLE", str(tmp_path / "a.json"))
    assert p.uuid() == first
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert p.uuid() != first


@pytest.fixture
def table_driven_cpu(monkeypatch):
    """"auto" on the CPU follows the auto table (as it does on CUDA), and a backend "spy" that
    forwards to the reference and, unlike it, counts as worth substituting for."""
    calls = []
    spy = types.SimpleNamespace(
        name="spy", supports=lambda cfg: None,
        prefill=lambda *a, **k: (calls.append("prefill"), reference.prefill(*a, **k))[1])
    monkeypatch.setitem(registry.BACKENDS, "spy", "spy_module")
    real_get = registry.get_backend_module
    monkeypatch.setattr(registry, "get_backend_module",
                        lambda n: spy if n == "spy" else real_get(n))
    monkeypatch.setattr(registry, "auto_order", lambda cfg: tuple(
        auto_table.order_for(cfg, arch="cpu") or ()) + ("sdpa", "reference"))
    monkeypatch.delenv("ATTN_OPS_BACKEND", raising=False)
    registry.clear_cache()
    yield calls
    registry.clear_cache()


def test_a_changed_table_changes_the_decision_on_a_warm_cache(tmp_path, monkeypatch,
                                                                table_driven_cpu):
    from torch._inductor.utils import fresh_cache
    model = HandAttention().eval()
    x = torch.randn(2, 7, 64)
    no_spy = _table(tmp_path / "ref.json", ["reference"])  # left alone under auto
    spy = _table(tmp_path / "spy.json", ["spy"])         # substituted, runs on the spy
    with fresh_cache(), torch._inductor.config.patch(fx_graph_cache=True), torch.no_grad():
        for table, substituted in ((no_spy, False), (no_spy, False), (spy, True), (spy, True),
                                   (no_spy, False)):
            monkeypatch.setenv("ATTN_OPS_AUTO_TABLE", table)
            torch._dynamo.reset()
            table_driven_cpu.clear()
            out = torch.compile(model, backend="attn_ops")(x)
            assert_close(out, model(x), *TOLERANCES[torch.float32])
            assert table_driven_cpu == (["prefill"] if substituted else []), table
    assert counters["inductor"]["fxgraph_cache_hit"] >= 2, "the repeated rounds came from cache"
