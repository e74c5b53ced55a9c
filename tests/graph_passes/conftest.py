"""Fixtures of the graph_passes tests that compile with real Inductor (opt in per module)."""

import pytest
import torch
from torch._dynamo.utils import counters

from attn_ops import registry
from attn_ops.backends import reference


@pytest.fixture
def prefill_calls(monkeypatch):
    """The backend choice in force at each reference prefill call (CPU runs the reference)."""
    calls = []
    real = reference.prefill

    def spy(*args, **kwargs):
        calls.append(registry.current_choice())
        return real(*args, **kwargs)
    monkeypatch.setattr(reference, "prefill", spy)
    registry.clear_cache()  # the dispatch memo keeps the function it bound before the spy
    yield calls
    registry.clear_cache()  # and must not keep the spy after the test


@pytest.fixture
def fresh_compile():
    """Nothing compiled before the test, nothing from the FX graph cache (counters are asserted)."""
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False):  # counters are asserted
        yield
    torch._dynamo.reset()
