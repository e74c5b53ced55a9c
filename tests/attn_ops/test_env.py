"""attn_ops.env: the per-call environment reads follow every ordinary way of changing a variable."""

import os
import unittest.mock

from attn_ops import env

_NAME = "ATTN_OPS_TEST_ENV_READER"


def test_reader_follows_set_delete_and_patches(monkeypatch):
    read = env.reader(_NAME)
    monkeypatch.delenv(_NAME, raising=False)
    assert read() is None
    monkeypatch.setenv(_NAME, "triton")
    assert read() == "triton"
    os.environ[_NAME] = "reference"
    assert read() == "reference"
    with unittest.mock.patch.dict(os.environ, {_NAME: "sdpa"}):
        assert read() == "sdpa"
    assert read() == "reference"
    del os.environ[_NAME]
    assert read() is None
    os.environ[_NAME] = "é-non-ascii"  # decoded as os.environ decodes it
    assert read() == os.environ[_NAME]
    del os.environ[_NAME]


def test_reader_follows_a_replaced_os_environ(monkeypatch):
    read = env.reader(_NAME)
    monkeypatch.setattr(os, "environ", {_NAME: "flash"})
    assert read() == "flash"
