"""Shared pytest setup: data checks on, seeded RNG, and the `cuda` marker's skip rule."""

import os

import pytest
import torch

# Every test runs with the data checks on: a bad index raises instead of reading out of bounds.
os.environ.setdefault("ATTN_OPS_CHECK", "1")

# Without a GPU the Triton kernels run through Triton's CPU interpreter. The mode is fixed when a
# kernel is decorated, so it must be set before any test module imports a kernel module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
