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


def test_switch_and_raw_reader_follow_set_delete_and_patches(monkeypatch):
    on = env.switch(_NAME)
    raw = env.raw_reader(_NAME)
    monkeypatch.delenv(_NAME, raising=False)
    assert not on() and raw() is None
    for value, expected in (("1", True), ("0", False), ("", False), ("yes", True)):
        monkeypatch.setenv(_NAME, value)
        assert on() is expected, value
        assert raw() == os.environ[_NAME].encode() or raw() == os.environ[_NAME]
    with unittest.mock.patch.dict(os.environ, {_NAME: "0"}):
        assert not on()
    assert on()  # "yes" again
    monkeypatch.setattr(os, "environ", {_NAME: "0"})  # replaced wholesale
    assert not on() and raw() == "0"
