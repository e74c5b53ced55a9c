"""The auto table loader: keys, lookup relaxation, the committed data (building: tests/benchmarks)."""

import json

import pytest
import torch

from attn_ops import registry
from attn_ops import auto_table
from attn_ops.contract import OpConfig

CUDA = torch.device("cuda")
KNOWN = set(registry.BACKENDS)


def _prefill(dtype=torch.bfloat16, d=128, paged=False, block_size=None):
    return OpConfig("prefill", CUDA, dtype, d, 8, num_heads=32, paged=paged,
                    block_size=block_size)


def _decode(dtype=torch.bfloat16, d=128, block_size=16):
    return OpConfig("decode", CUDA, dtype, d, 8, num_heads=32, paged=True, block_size=block_size)


@pytest.mark.parametrize("op,config,expected", [
    ("prefill", _prefill(), ("prefill", "sm90", "bf16", "d128", "dense")),
    ("prefill", _prefill(torch.float16, 40, True, 16), ("prefill", "sm90", "fp16", "d64", "bs16")),
    ("decode", _decode(torch.float32, 80, 17), ("decode", "sm90", "fp32", "d128", "bs32")),
    ("decode", _decode(d=256, block_size=1), ("decode", "sm90", "bf16", "d256", "bs16")),
    ("decode", _decode(d=192, block_size=512), ("decode", "sm90", "bf16", "d256", "bs256")),
])
def test_features_bucket_static_config(op, config, expected):
    assert auto_table.features(config, "sm90") == expected


TABLE = {"entries": {
    "decode|sm90|bf16|d128|bs16": {"order": ["triton", "flash"]},
    "decode|sm90|bf16|d128|*": {"order": ["flash"]},
    "decode|sm90|*|*|*": {"order": ["reference", "triton"]},
    "prefill|*|*|*|*": {"order": ["flash", "flash", "triton"]},
}}


@pytest.mark.parametrize("op,config,arch,expected", [
    ("decode", _decode(), "sm90", ("triton", "flash")),                      # exact key
    ("decode", _decode(block_size=256), "sm90", ("flash", "triton")),        # kv relaxed
    ("decode", _decode(torch.float16), "sm90", ("reference", "triton", "flash")),  # dtype too
    ("decode", _decode(), "sm80", None),                                     # other GPU: none
    ("prefill", _prefill(), "sm100", ("flash", "triton")),                  # op-wide default
])
def test_lookup_relaxes_from_the_right_and_appends_fallbacks(op, config, arch, expected):
    assert auto_table.order_for(config, arch=arch, table=TABLE) == expected


def test_committed_table_is_valid_and_names_known_backends():
    table = auto_table.load()
    assert table["source"] and table["entries"]
    for key, entry in table["entries"].items():
        assert len(key.split("|")) == 5 and key.split("|")[0] in ("prefill", "decode",
                                                                  "store_kvcache")
        assert set(entry["order"]) <= KNOWN, key
    if table["source"].startswith("provisional"):
        assert "regenerate with" in table["source"]
    else:  # measured: every exact entry carries its times
        assert any("median_us" in e for e in table["entries"].values())


def test_malformed_table_fails_loudly(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"entries": {"prefill|sm90": {"order": ["flash"]}}}))
    with pytest.raises(ValueError, match="not op|arch|dtype|head|kv"):
        auto_table.load(str(bad))
    bad.write_text(json.dumps({"entries": {"prefill|sm90|bf16|d128|dense": {"order": []}}}))
    with pytest.raises(ValueError, match="non-empty 'order'"):
        auto_table.load(str(bad))


def test_registry_follows_the_table(monkeypatch, tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(TABLE))
    monkeypatch.setenv("ATTN_OPS_AUTO_TABLE", str(path))
    monkeypatch.setattr(auto_table, "arch_of", lambda device: "sm90")
    assert registry.auto_order(_decode()) == ("triton", "flash", "sdpa", "reference")
    assert registry.auto_order(_prefill()) == ("flash", "triton", "sdpa", "reference")
    monkeypatch.setattr(auto_table, "arch_of", lambda device: "sm75")
    assert registry.auto_order(_decode()) == registry._AUTO_DEFAULT["cuda"]
