"""The demo's tests share one small model (random weights, 2 layers, GQA 4/2 heads)."""

import pytest

from attn_ops.demo.model import DemoConfig, DemoLlama

_SMALL = DemoConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=96)


@pytest.fixture(scope="module")
def model():
    """Tests read its sizes from ``model.cfg``."""
    return DemoLlama(_SMALL, seed=3).eval()
