"""Which tests of this folder run in which Triton mode.

Triton fixes interpreted vs compiled kernels when a kernel module is first imported, so one pytest
session runs one mode: tests marked ``cuda`` need compiled kernels on a GPU, every other test the
CPU interpreter (``TRITON_INTERPRET=1``, which tests/conftest.py sets on a machine without a GPU;
on a GPU machine set it before pytest to run them there).
"""

import os

import pytest


@pytest.fixture(autouse=True)
def _triton_mode(request):
    pytest.importorskip("triton")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if request.node.get_closest_marker("cuda") is not None:
        if interpreting:
            pytest.skip("TRITON_INTERPRET=1 runs the interpreter; this test needs compiled kernels")
    elif not interpreting:
        pytest.skip("an interpreter test: set TRITON_INTERPRET=1 before pytest")
