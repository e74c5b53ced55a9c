"""The auto table loader: keys, lookup relaxation, flash-provider items, the committed data
(building: tests/benchmarks)."""

import json

import pytest
import torch

import attn_ops
from attn_ops import auto_table, contract, registry
from attn_ops.backends import flash
from attn_ops.contract import OpConfig
from tests.support.flash_fakes import FAKE_FA3_FWD

CUDA = torch.device("cuda")
KNOWN = set(registry.BACKENDS)


def _prefill(dtype=torch.bfloat16, d=128, paged=False, block_size=None):
    return OpConfig("prefill", CUDA, dtype, d, 8, num_heads=32, paged=paged,
                    block_size=block_size)


def _decode(dtype=torch.bfloat16, d=128, block_size=16):
    return OpConfig("decode", CUDA, dtype, d, 8, num_heads=32, paged=True, block_size=block_size)


@pytest.mark.parametrize("op,config,expected", [
    ("prefill", _prefill(), ("prefill", "sm90", "bf16", "d128", "dense", "any")),
    ("prefill", _prefill(torch.float16, 40, True, 16),
     ("prefill", "sm90", "fp16", "d64", "bs16", "any")),
    ("prefill", _prefill().replace(short_keys=True),
     ("prefill", "sm90", "bf16", "d128", "dense", "short")),
    ("prefill", _prefill().replace(short_keys=False),
     ("prefill", "sm90", "bf16", "d128", "dense", "long")),
    ("decode", _decode(torch.float32, 80, 17), ("decode", "sm90", "fp32", "d128", "bs32", "any")),
    ("decode", _decode(d=256, block_size=1), ("decode", "sm90", "bf16", "d256", "bs16", "any")),
    ("decode", _decode(d=192, block_size=512),
     ("decode", "sm90", "bf16", "d256", "bs256", "any")),
])
def test_features_bucket_static_config(op, config, expected):
    assert auto_table.features(config, "sm90") == expected


def test_a_prefill_config_says_whether_its_keys_are_short():
    """``max_seqlen_k`` (a host int of the call) puts a prefill in the short or the long bucket
    at contract.SHORT_PREFILL_KEYS; without it the config says nothing."""
    q, k = torch.empty(5, 4, 64), torch.empty(7, 2, 64)
    limit = contract.SHORT_PREFILL_KEYS
    assert [contract.prefill_config(q, k, max_seqlen_k=n).short_keys
            for n in (None, 1, limit, limit + 1)] == [None, True, True, False]


def test_tables_without_the_keys_feature_read_as_before():
    """Formats 1 and 2 keyed five features: a fully specific decode / store key is that op's
    (keys ``any``); a prefill key, measured over prompts of any length, stands for both buckets
    (``*``), as do wildcard keys."""
    assert [auto_table.upgrade_key(k) for k in (
        "decode|sm90|bf16|d128|bs16", "prefill|sm90|bf16|d128|dense", "decode|sm90|*|*|*",
        "prefill|sm90|bf16|d128|dense|short")] == [
        "decode|sm90|bf16|d128|bs16|any", "prefill|sm90|bf16|d128|dense|*",
        "decode|sm90|*|*|*|*", "prefill|sm90|bf16|d128|dense|short"]
    short, long = (_prefill().replace(short_keys=b) for b in (True, False))
    table = {"version": 3, "entries": {
        "prefill|sm90|bf16|d128|dense|short": {"order": ["triton", "flash"]},
        "prefill|sm90|bf16|d128|dense|*": {"order": ["flash", "triton"]}}}
    assert auto_table.order_for(short, "sm90", table)[0] == "triton"
    assert auto_table.order_for(long, "sm90", table)[0] == "flash"  # relaxed to the * key
    assert auto_table.order_for(_prefill(), "sm90", table)[0] == "flash"


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
        assert len(key.split("|")) == 6 and key.split("|")[0] in ("prefill", "decode",
                                                                  "store_kvcache")
        assert {auto_table.split_item(i)[0] for i in entry["order"]} <= KNOWN, key
        for item in entry["order"]:  # a named flash provider is one the flash backend knows
            assert auto_table.split_item(item)[1] in (None,) + flash.PROVIDER_ORDER, key
    if table["source"].startswith("provisional"):
        assert "regenerate with" in table["source"]
    else:  # measured: every exact entry carries its times
        assert any("median_us" in e or "runs" in e for e in table["entries"].values())


def test_malformed_table_fails_loudly(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"entries": {"prefill|sm90": {"order": ["flash"]}}}))
    with pytest.raises(ValueError, match=r"key 'prefill\|sm90' is not op\|arch\|dtype\|head\|kv"):
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


# ---------------------------------------------------------------------------------------------
# Flash providers (format version 2): "flash:<provider>" items
# ---------------------------------------------------------------------------------------------

DENSE_V2 = "prefill|sm90|bf16|d128|dense"  # a format-2 key (five features)
DENSE = DENSE_V2 + "|*"  # ... as read: for prefills of any length
# aten::_flash_attention_forward's argument names in torch 2.11 (no block_table).
ATEN_211 = ["query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p",
            "is_causal", "return_debug_mask", "scale", "window_size_left", "window_size_right",
            "seqused_k", "alibi_slopes"]
INSTALLS = {"fa3_fwd": (("fa3_fwd", flash._fa3_fwd_provider(FAKE_FA3_FWD)),
                        ("aten", flash.aten_provider(ATEN_211, "2.11.0"))),
            "aten": (("fa3_fwd", "fa3_fwd_interface is not installed"),
                     ("aten", flash.aten_provider(ATEN_211, "2.11.0"))),
            "none": (("aten", "this PyTorch build has no FlashAttention kernels"),)}
V2 = {"version": 2, "entries": {
    DENSE_V2: {"order": ["flash:fa3_fwd", "triton", "flash:aten"], "runs": [
        {"order": ["triton", "flash:aten"], "flash": "aten", "device": "NVIDIA H100 80GB HBM3",
         "median_us": {"triton": 330.0, "flash:aten": 545.8}},
        {"order": ["flash:fa3_fwd", "triton"], "flash": "fa3_fwd", "device": "NVIDIA H200",
         "median_us": {"flash:fa3_fwd": 216.8, "triton": 351.2}}]},
    "prefill|sm90|bf16|*|*": {"order": ["triton", "flash:aten"], "wins": {"triton": 3,
                                                                          "flash:aten": 0}}}}


@pytest.fixture
def on_sm90(monkeypatch, tmp_path):
    """A CPU-only machine that looks like an sm90 GPU to the table and to the flash backend,
    whose flash providers are the ones ``install(name)`` picks from :data:`INSTALLS`."""
    monkeypatch.setattr(auto_table, "arch_of", lambda device: "sm90")
    monkeypatch.delenv("ATTN_OPS_FLASH_IMPL", raising=False)
    monkeypatch.delenv("ATTN_OPS_AUTO_TABLE", raising=False)  # the committed table by default

    def install(name, table=V2):
        providers = INSTALLS[name]
        monkeypatch.setattr(flash, "_plan", lambda config, forced: flash.choose(
            config, (9, 0), providers, forced))
        if table is not None:
            path = tmp_path / f"table_{len(list(tmp_path.iterdir()))}.json"
            path.write_text(json.dumps(table))
            monkeypatch.setenv("ATTN_OPS_AUTO_TABLE", str(path))
    yield install
    auto_table.load.cache_clear()


def test_loader_accepts_both_versions_and_checks_provider_items(tmp_path):
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(V2))
    loaded = auto_table.load(str(path))
    assert loaded == {**V2, "version": 3, "entries": {
        auto_table.upgrade_key(k): e for k, e in V2["entries"].items()}}
    assert sorted(loaded["entries"]) == ["prefill|sm90|bf16|*|*|*", DENSE]
    for n, (bad, match) in enumerate([
            ({**V2, "version": 1}, "only 'flash:<provider>' items, and only in format"),  # v1
            ({"version": 2, "entries": {DENSE_V2: {"order": ["triton:x"]}}}, "'triton:x'"),
            ({**V2, "version": 3}, r"kv\|keys \(format version 3"),
            ({**V2, "version": 4}, "format version 4 is not one of"),
            ({"version": 2, "entries": {DENSE_V2: {"order": ["triton"], "runs": [{}]}}}, "runs")]):
        path = tmp_path / f"bad{n}.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            auto_table.load(str(path))
    auto_table.load.cache_clear()  # the committed table loads from its file
    assert auto_table.load()["version"] in auto_table.VERSIONS
    assert auto_table.load.cache_info().currsize == 1


@pytest.mark.parametrize("install,expected", [
    ("fa3_fwd", ("flash", "triton", "sdpa", "reference")),  # FA3 measured first: flash first
    ("aten", ("triton", "flash", "sdpa", "reference")),     # only PyTorch's FA2: Triton first
    ("none", ("triton", "flash", "sdpa", "reference")),     # no provider: flash as a fallback
])
def test_auto_order_takes_flash_only_with_the_measured_provider(on_sm90, install, expected):
    on_sm90(install)
    assert flash.provider_id(_prefill()) == (None if install == "none" else install)
    assert registry.auto_order(_prefill()) == expected
    # Paged prefill relaxes to the wildcard; fa3-fwd has no paged KV, so aten would serve it
    # only with a block table (torch >= 2.13): here no provider, flash:aten skipped.
    assert registry.auto_order(_prefill(paged=True, block_size=256))[0] == "triton"


def test_plain_flash_items_keep_their_meaning(on_sm90):
    on_sm90("aten", {"entries": {DENSE_V2: {"order": ["flash", "triton"]}}})  # version 1
    assert registry.auto_order(_prefill()) == ("flash", "triton", "sdpa", "reference")


def test_forcing_a_provider_follows_into_the_order(on_sm90, monkeypatch):
    on_sm90("fa3_fwd")
    monkeypatch.setenv("ATTN_OPS_FLASH_IMPL", "aten")
    assert registry.auto_order(_prefill())[:2] == ("triton", "flash")


def test_explain_says_which_provider_was_measured_and_what_was_skipped(on_sm90, monkeypatch):
    on_sm90("fa3_fwd")
    assert auto_table.why(_prefill(), "flash") == (
        f"fa3_fwd measured 1.62x faster than triton on NVIDIA H200 for this key ({DENSE}); "
        "flash:aten skipped: flash would serve this with fa3_fwd")
    on_sm90("aten")
    assert auto_table.why(_prefill(), "triton") == (
        f"triton measured 1.65x faster than flash:aten on NVIDIA H100 80GB HBM3 for this key "
        f"({DENSE}); flash:fa3_fwd skipped: flash would serve this with aten")
    paged = _prefill(paged=True, block_size=256)
    assert auto_table.why(paged, "triton") == (
        "wildcard entry prefill|sm90|bf16|*|*|* (keys won: triton 3, flash:aten 0); "
        "flash:aten skipped: no flash provider serves this here")
    # Through attn_ops.explain: the backend auto picks, then why (triton's own verdict aside).
    monkeypatch.setattr(registry, "_reason", lambda name, config: (None, None))
    on_sm90("fa3_fwd")
    assert attn_ops.explain(_prefill())["auto"].startswith("flash (fa3_fwd measured 1.62x")


def test_committed_table_sends_only_fa3_to_flash_for_dense_bf16_prefill(on_sm90):
    """The committed table holds the H200's FA3 run for this key (flash:fa3_fwd first) beside
    the H100's aten run (triton first): a machine with only PyTorch's FA2 keeps dense bf16 d128
    prefill on Triton (aten measured 0.60x of it), one with fa3-fwd goes to flash."""
    entry = auto_table.load()["entries"][DENSE]
    assert entry["order"][:2] == ["flash:fa3_fwd", "triton"]
    assert {r.get("flash") for r in entry["runs"]} == {"fa3_fwd", "aten"}
    on_sm90("aten", table=None)
    assert registry.auto_order(_prefill())[:2] == ("triton", "flash")
    assert "flash:fa3_fwd skipped: flash would serve this with aten" in auto_table.why(
        _prefill(), "triton")
    on_sm90("fa3_fwd", table=None)
    assert registry.auto_order(_prefill())[:2] == ("flash", "triton")
    # (1.35x before the Gluon prefill's staged output store; 1.01x since)
    assert auto_table.why(_prefill(), "flash").startswith(
        "fa3_fwd measured 1.01x faster than triton on NVIDIA H200")
    # The full H200 grid (eleventh pass, 2026-11-30) measured FA3 at every bf16 dense head
    # dim: it wins each (d64 1.39x before the Gluon prefill served D 64 this fast, d256 1.60x).
    for d, ratio in ((64, "1.12x"), (256, "1.53x")):
        assert registry.auto_order(_prefill(d=d))[:2] == ("flash", "triton")
        assert auto_table.why(_prefill(d=d), "flash").startswith(f"fa3_fwd measured {ratio}")
    # Measured apart by the keys of a sequence (thirteenth pass): with fa3-fwd installed, short
    # bf16 dense prompts (max_seqlen_k <= 1024) stay on Triton, longer ones go to FA3; D 256
    # (no Gluon kernel there) goes to FA3 at both.
    for d, short_first in ((64, "triton"), (128, "triton"), (256, "flash")):
        short, long = (_prefill(d=d).replace(short_keys=b) for b in (True, False))
        assert registry.auto_order(short)[0] == short_first, d
        assert registry.auto_order(long)[0] == "flash", d
        assert "|dense|short" in auto_table.why(short, short_first)
    assert auto_table.why(_prefill().replace(short_keys=True), "triton").startswith(
        "triton measured 1.12x faster than flash:fa3_fwd on NVIDIA H200")
    # fa3-fwd is bf16-only: fp16 keys hold aten's runs, and Triton measured faster there.
    assert registry.auto_order(_prefill(torch.float16, d=64))[:2] == ("triton", "flash")
    # Paged prefill has no FA3 contender (fa3-fwd has no paged KV): Triton only.
    assert registry.auto_order(_prefill(paged=True, block_size=16))[0] == "triton"


def test_the_graph_cache_uuid_follows_a_changed_provider(on_sm90):
    """The passes' uuid hashes the table in force: swapping which provider a row names changes
    both the decision and the uuid (a warm FX graph cache cannot serve the old decision)."""
    from graph_passes.passes.handwritten_attention import HandwrittenAttentionPass
    on_sm90("fa3_fwd")
    first = (HandwrittenAttentionPass().uuid(), registry.auto_order(_prefill()))
    swapped = json.loads(json.dumps(V2).replace("fa3_fwd", "fa3"))
    on_sm90("fa3_fwd", swapped)
    second = (HandwrittenAttentionPass().uuid(), registry.auto_order(_prefill()))
    assert first[0] != second[0] and first[1][0] == "flash" and second[1][0] == "triton"
