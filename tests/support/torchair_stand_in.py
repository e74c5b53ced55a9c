"""A stand-in for the parts of torchair the NPU compile backend imports. TEST-ONLY.

torchair ships with torch_npu and needs CANN, which no machine of this project has. This module
builds ``torchair``, ``torchair.ge``, ``torchair._ge_concrete_graph.ge_apis`` and
``torchair.ops._npu_fused_infer_attention_score_v2`` as plain modules whose GE op builders
*evaluate* on torch tensors instead of adding graph nodes (``Slice`` slices, ``SelectV2`` is
``torch.where``, ``ScatterPaKvCache`` calls the torch_npu emulator's scatter, ...). A converter
run against it therefore computes a value that can be compared with the reference backend: a
wrong slice, cast or lengths vector shows up as a wrong number. Only the builders the converters
call exist; a new one fails with AttributeError, which is the point.

:func:`installed` puts the modules in ``sys.modules`` for a block and removes them, and every
module that imported them, afterwards.
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch

REGISTERED: dict = {}  # op -> converter, filled by register_fx_node_ge_converter


class _Mode:
    def __init__(self, value: str):
        self.value = value


class CompilerConfig:
    """``torchair.CompilerConfig``: only ``mode`` (assigned a str, read as ``mode.value``)."""

    def __init__(self):
        self._mode = _Mode("max-autotune")

    @property
    def mode(self):
        return self._mode

    @mode.setter
    def mode(self, value: str):
        self._mode = _Mode(value)


def get_npu_backend(*, compiler_config=None, custom_decompositions=None):
    """A backend that records what it was built with and every graph it compiles."""
    def npu_backend(gm, example_inputs):
        npu_backend.graphs.append(gm)
        return gm.forward
    npu_backend.graphs = []
    get_npu_backend.last = npu_backend
    npu_backend.compiler_config = compiler_config
    npu_backend.custom_decompositions = custom_decompositions
    return npu_backend


def register_fx_node_ge_converter(op):
    def register(fn):
        REGISTERED[op] = fn
        return fn
    return register


class DataType:
    DT_INT64, DT_INT32, DT_BOOL = torch.int64, torch.int32, torch.bool


def Const(values, dtype=DataType.DT_INT64, readable=True):  # noqa: N802 (GE's names)
    if isinstance(values, torch.Tensor):
        return values.to(dtype)
    return torch.tensor(values, dtype=dtype)


def Cast(x, dst_type):  # noqa: N802
    return x.to(dst_type)


def _slice(x, offsets, sizes):
    for dim, (start, size) in enumerate(zip(offsets.tolist(), sizes.tolist())):
        x = x.narrow(dim, start, size)
    return x


def _argmax(x, dim, dtype):
    return x.argmax(int(dim)).to(dtype)


def _reduce_any(x, axes, keep_dims=False):
    return x.any(dim=int(axes[0]), keepdim=keep_dims)


def _scatter_pa_kv_cache(key, k_cache, slots, value, v_cache, *unused, cache_mode, **kwargs):
    torch.ops.npu.npu_scatter_pa_kv_cache(key, value, k_cache, v_cache, slots,
                                          cache_mode=cache_mode)
    return k_cache, v_cache


def _unsqueeze(x, axes):
    for a in sorted(axes):
        x = x.unsqueeze(a)
    return x


GE_APIS = {
    "Slice": _slice, "Reshape": lambda x, shape: x.reshape(shape.tolist()),
    "Sub": torch.sub, "Greater": torch.gt, "GreaterEqual": torch.ge,
    "SelectV2": torch.where, "ZerosLike": torch.zeros_like, "ArgMaxV2": _argmax,
    "ReduceAny": _reduce_any, "GatherV2": lambda x, idx, axis: x.index_select(int(axis), idx),
    "Unsqueeze": _unsqueeze, "Squeeze": lambda x, axis: x.squeeze(axis[0]),
    "ScatterPaKvCache": _scatter_pa_kv_cache,
}


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def with_symsize(t: torch.Tensor) -> torch.Tensor:
    """A tensor as a GE converter receives it: with ``symsize`` (static sizes here)."""
    t.symsize = list(t.shape)
    return t


@contextlib.contextmanager
def installed():
    """``import torchair`` (and its submodules the converters use) resolves to this stand-in."""
    root = _module("torchair", CompilerConfig=CompilerConfig, get_npu_backend=get_npu_backend,
                   register_fx_node_ge_converter=register_fx_node_ge_converter)
    root.__path__ = []
    root.ge = _module("torchair.ge", DataType=DataType, Const=Const, Cast=Cast)
    root._ge_concrete_graph = _module("torchair._ge_concrete_graph")
    root._ge_concrete_graph.__path__ = []
    root._ge_concrete_graph.ge_apis = _module("torchair._ge_concrete_graph.ge_apis", **GE_APIS)
    root.ops = _module("torchair.ops")
    root.ops.__path__ = []
    root.ops._npu_fused_infer_attention_score_v2 = _module(
        "torchair.ops._npu_fused_infer_attention_score_v2")
    mods = {m.__name__: m for m in (root, root.ge, root._ge_concrete_graph,
                                    root._ge_concrete_graph.ge_apis, root.ops,
                                    root.ops._npu_fused_infer_attention_score_v2)}
    before = set(sys.modules)
    sys.modules.update(mods)
    REGISTERED.clear()
    try:
        yield root
    finally:
        for name in set(sys.modules) - before:  # the stand-in and the modules that imported it
            if "torchair" in name:
                del sys.modules[name]
        REGISTERED.clear()
