"""Backend registry: which module serves an op for a device and configuration.

Each backend is a module under ``attn_ops.backends`` exposing ``name``, ``supports(op, **config)``
(None, or the reason it can't serve), and ``store_kvcache`` / ``prefill`` / ``decode`` with the
op signatures. Modules are imported only when first considered, so importing ``attn_ops`` pulls
in no triton, flash_attn or torch_npu.

Choice, strongest first:
1. ``backend=`` argument of the Python wrappers in :mod:`attn_ops.ops`;
2. the innermost :func:`use_backend` context manager (a ``ContextVar``: per thread / task);
3. the ``ATTN_OPS_BACKEND`` environment variable;
4. ``"auto"``: per device type, the first backend in :func:`auto_order` that supports the
   configuration (the reference always does). The order is static data, so the choice is
   deterministic and never autotunes (safe inside CUDA graph capture).
An explicit choice that cannot serve the call raises ``RuntimeError`` with the backend's reason.

The choice is made when the op runs, not when it is traced, so a graph compiled once follows the
context it is called in.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from types import ModuleType

BACKENDS = {
    "reference": "attn_ops.backends.reference",
    "sdpa": "attn_ops.backends.sdpa",
    "triton": "attn_ops.backends.triton",
    "flash": "attn_ops.backends.flash",
    "npu": "attn_ops.backends.npu",
}

# Device type -> backends tried by "auto", fastest first. CUDA's order per op and configuration
# comes from measured data (attn_ops/backends/auto_table.py) when that module is present.
_AUTO_DEFAULT = {
    "cuda": ("triton", "flash", "sdpa", "reference"),
    "npu": ("npu", "reference"),
}
# Every other device type (the CPU first of all): PyTorch's fused SDPA on padded tiles.
_AUTO_OTHER = ("sdpa", "reference")
# Appended after a measured CUDA order: the pure-torch backends, fastest first.
_AUTO_TAIL = ("sdpa", "reference")

_CHOICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("attn_ops_backend",
                                                                     default=None)


class BackendUnavailable(RuntimeError):
    """An explicitly chosen backend cannot serve this call."""


def get_backend_module(name: str) -> ModuleType:
    """Import (once) and return the module of backend ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; expected 'auto' or one of "
                         f"{sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def _module_or_reason(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return get_backend_module(name), None
    except ImportError as e:  # a backend module whose own imports fail
        return None, f"backend {name!r} could not be imported: {e}"


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run the attn ops inside the block on backend ``name`` ("auto" or None: automatic)."""
    if name is not None and name != "auto":
        get_backend_module(name)  # fail early on a typo
    token = _CHOICE.set(name)
    try:
        yield
    finally:
        _CHOICE.reset(token)


def current_choice() -> str:
    """The backend name in force here: context manager, then ATTN_OPS_BACKEND, then "auto"."""
    choice = _CHOICE.get()
    if choice is None:
        choice = os.environ.get("ATTN_OPS_BACKEND") or "auto"
    return choice


def auto_order(op: str, config: dict) -> tuple[str, ...]:
    """Backends "auto" tries for ``op`` on ``config['device']``, fastest first."""
    device_type = config["device"].type
    if device_type == "cuda":
        try:
            from attn_ops.backends import auto_table
        except ImportError:
            pass
        else:
            order = auto_table.order_for(op, config)
            if order:
                return tuple(order) + tuple(n for n in _AUTO_TAIL if n not in order)
    return _AUTO_DEFAULT.get(device_type, _AUTO_OTHER)


@functools.lru_cache(maxsize=4096)
def _select_cached(op: str, choice: str, config_items: tuple) -> ModuleType:
    config = dict(config_items)
    if choice != "auto":
        module, reason = _module_or_reason(choice)
        if module is not None:
            reason = module.supports(op, **config)
        if reason is not None:
            raise BackendUnavailable(
                f"attn backend {choice!r} cannot run {op} on {config['device']} with "
                f"{_describe(config)}: {reason}. Choose another with backend=..., "
                f"attn_ops.use_backend(...) or ATTN_OPS_BACKEND, or use 'auto'.")
        return module
    for name in auto_order(op, config):
        module, reason = _module_or_reason(name)
        if module is not None and module.supports(op, **config) is None:
            return module
    return get_backend_module("reference")


def _describe(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items() if k != "device")


def select(op: str, config: dict, choice: str | None = None) -> ModuleType:
    """The backend module that runs ``op`` for ``config`` (a dict of hashable values)."""
    return _select_cached(op, choice or current_choice(), tuple(config.items()))


def clear_cache() -> None:
    """Forget cached choices (after installing a package or changing TRITON_INTERPRET)."""
    _select_cached.cache_clear()
    from attn_ops import ops  # the per-signature memo caches choices too
    ops.clear_memo()


def explain(op: str, config: dict) -> dict[str, str]:
    """For each known backend, "ok" or the reason it can't serve ``op`` with ``config``."""
    out = {}
    for name in BACKENDS:
        module, reason = _module_or_reason(name)
        if module is not None:
            reason = module.supports(op, **config)
        out[name] = reason or "ok"
    return out
