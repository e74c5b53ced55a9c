"""get_npu_backend_with_attn: which torchair path each mode takes (against a torchair stand-in).

Capture modes (reduce-overhead, npugraph_ex) must wrap torchair's backend in the decomposition
pass; max-autotune must hand torchair's backend back unchanged with the GE converters
registered. The entry point kept at ``graph_passes.torchair_backend`` must be the same function.
Without torchair both imports fail on exactly ``torchair``.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import attn_ops  # noqa: F401  (registers torch.ops.attn)
from tests.support import npu_emulator as emu
from tests.support import torchair_stand_in as stand_in
from tests.support.helpers import importable_stand_ins

EMULATED = emu.install()

MODULE = "attn_ops.backends.npu.torchair_backend"


def _store(key, value, k_cache, v_cache, slots):
    torch.ops.attn.store_kvcache(key, value, k_cache, v_cache, slots)
    return k_cache


def _store_graph():
    kc = torch.zeros(2, 16, 2, 64)
    args = (torch.randn(3, 2, 64), torch.randn(3, 2, 64), kc, kc.clone(), torch.tensor([0, 5, 9]))
    return make_fx(_store, tracing_mode="fake")(*args), args


def _targets(gm) -> set[str]:
    return {str(n.target).split(".")[0] for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.skipif(not EMULATED, reason="a real torch_npu is loaded")
@pytest.mark.parametrize("mode", ["reduce-overhead", "npugraph_ex"])
def test_capture_modes_hand_torchair_the_decomposed_graph(mode):
    with stand_in.installed() as torchair:
        backend_module = importlib.import_module(MODULE)
        config = torchair.CompilerConfig()
        config.mode = mode
        backend = backend_module.get_npu_backend_with_attn(compiler_config=config,
                                                           store_impl="npu_scatter_pa_kv_cache")
        gm, args = _store_graph()
        compiled = backend(gm, list(args))
        (inner_gm,) = torchair.get_npu_backend.last.graphs
        assert torchair.get_npu_backend.last.compiler_config is config
        assert "npu" in _targets(inner_gm) and "attn" not in _targets(inner_gm)
        assert stand_in.REGISTERED == {}, "capture modes need no GE converter"
        kc = compiled(*args)
        assert torch.equal(kc.view(-1, 2, 64)[[0, 5, 9]], args[0])


def test_max_autotune_is_torchair_with_the_converters_registered():
    with stand_in.installed() as torchair:
        backend_module = importlib.import_module(MODULE)
        backend = backend_module.get_npu_backend_with_attn(custom_decompositions={"x": 1})
        assert backend.compiler_config.mode.value == "max-autotune"
        assert backend.custom_decompositions == {"x": 1}
        assert set(stand_in.REGISTERED) == {torch.ops.attn.prefill.default,
                                            torch.ops.attn.decode.default,
                                            torch.ops.attn.store_kvcache.default}
        entry = importlib.import_module("graph_passes.torchair_backend")
        assert entry.get_npu_backend_with_attn is backend_module.get_npu_backend_with_attn
        assert torchair.CompilerConfig is entry.get_npu_backend_with_attn.__globals__[
            "torchair"].CompilerConfig


@pytest.mark.parametrize("name", [MODULE, "graph_passes.torchair_backend"])
def test_without_torchair_the_import_fails_on_torchair(name, monkeypatch, tmp_path):
    sys.modules.pop(name, None)
    with importable_stand_ins(monkeypatch, tmp_path, "torch_npu"):  # a guarded import shows
        with pytest.raises(ImportError) as e:
            importlib.import_module(name)
        assert e.value.name == "torchair"
        assert "torch_npu" not in sys.modules
