"""Backend registry: which module serves a call, chosen once per call signature.

A backend is a module under ``attn_ops.backends`` exposing ``name``,
``supports(config: OpConfig) -> None | reason`` and ``store_kvcache`` / ``prefill`` / ``decode``
with the op signatures, and optionally ``bind(config) -> function``: the op function with every
choice that depends only on ``config`` made once (a provider, a launch configuration), or
``bind_args(config, args) -> function``: the function of one call signature, planned from its
first call's arguments and called with the op's own positional arguments (see
:func:`bind_args`). Modules are imported only when first considered, so importing ``attn_ops``
pulls in no triton, flash_attn or torch_npu.

Choice, strongest first:
1. ``backend=`` argument of the Python wrappers in :mod:`attn_ops.api`;
2. the innermost :func:`use_backend` context manager (a ``ContextVar``: per thread / task);
3. the ``ATTN_OPS_BACKEND`` environment variable;
4. ``"auto"``: per device, the first backend in :func:`auto_order` whose ``supports`` accepts the
   configuration (the reference always does). The order is static data (the measured table of
   :mod:`attn_ops.auto_table`), so the choice is deterministic and never autotunes: safe inside
   CUDA graph capture.
An explicit choice that cannot serve the call raises :class:`BackendUnavailable` with the reason.

The choice is made when the op runs, not when it is traced, so a graph compiled once follows the
context it is called in. :func:`dispatch` memoises it (with the metadata checks that precede it
and the backend's ``bind``) per call signature: the one cache of the op path.
"""

from __future__ import annotations

import contextvars
import importlib
from collections.abc import Callable, Hashable
from types import ModuleType

from attn_ops import env
from attn_ops.contract import OpConfig

BACKENDS = {
    "reference": "attn_ops.backends.reference",
    "sdpa": "attn_ops.backends.sdpa",
    "triton": "attn_ops.backends.triton",
    "flash": "attn_ops.backends.flash",
    "npu": "attn_ops.backends.npu",
}

# Device type -> backends tried by "auto", fastest first, where no measured order applies.
_AUTO_DEFAULT = {
    "cuda": ("triton", "flash", "sdpa", "reference"),
    "npu": ("npu", "reference"),
}
# Every other device type (the CPU first of all): sdpa wherever its supports() accepts the call
# (no softcap, sinks, LSE, fp8 or merge), else the reference. Measured on a 2-core CPU at one
# thread (benchmarks/bench_cpu_auto.py, results/cpu_auto_t1.csv, 2026-11-30): sdpa/reference
# time 0.19-0.90 over 64 prefill and decode shapes; the store is one shared function.
_AUTO_OTHER = ("sdpa", "reference")
# Appended after a measured order: the pure-torch backends, fastest first.
_AUTO_TAIL = ("sdpa", "reference")

_env_backend = env.reader("ATTN_OPS_BACKEND")
_env_backend_raw = env.raw_reader("ATTN_OPS_BACKEND")  # the memo's key for the env choice
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


def _reason(name: str, config: OpConfig) -> tuple[ModuleType | None, str | None]:
    module, reason = _module_or_reason(name)
    if module is not None:
        reason = module.supports(config)
    return module, reason


class use_backend:  # noqa: N801 (used as a function: ``with use_backend("triton"):``)
    """Run the attn ops inside the block on backend ``name`` ("auto" or None: automatic).

    A class rather than a ``contextlib.contextmanager`` generator: entering and leaving cost
    ~1 us instead of ~4 (CPU, 2026-11-30), paid by every call with ``backend=``.
    """

    __slots__ = ("name", "_token")

    def __init__(self, name: str | None):
        if name is not None and name != "auto" and (name not in _imported
                                                     or name not in BACKENDS):
            get_backend_module(name)  # fail early on a typo (or a backend that can't import)
            _imported.add(name)
        self.name = name

    def __enter__(self):
        self._token = _CHOICE.set(self.name)

    def __exit__(self, *exc):
        _CHOICE.reset(self._token)
        return False


_imported: set[str] = set()  # backends use_backend has seen import


def current_choice() -> str:
    """The backend name in force here: context manager, then ATTN_OPS_BACKEND, then "auto"."""
    choice = _CHOICE.get()
    if choice is None:
        choice = _env_backend() or "auto"  # a dict lookup, not os.environ.get: see attn_ops.env
    return choice


def auto_order(config: OpConfig) -> tuple[str, ...]:
    """Backends "auto" tries for ``config``, fastest first. A table item ``flash:<provider>``
    counts as ``flash`` only where the flash backend would serve ``config`` with that provider
    (see :mod:`attn_ops.auto_table`). Called once per call signature (the dispatch memo)."""
    from attn_ops import auto_table  # reads a JSON file on first use: not at import

    order = auto_table.order_for(config)
    if order:
        return tuple(order) + tuple(n for n in _AUTO_TAIL if n not in order)
    return _AUTO_DEFAULT.get(config.device.type, _AUTO_OTHER)


def select(config: OpConfig, choice: str | None = None) -> ModuleType:
    """The backend module that runs ``config.op`` for ``config`` under ``choice``.

    Raises:
        BackendUnavailable: ``choice`` names a backend that cannot serve ``config``.
    """
    choice = choice or current_choice()
    if choice != "auto":
        module, reason = _reason(choice, config)
        if reason is not None:
            raise BackendUnavailable(
                f"attn backend {choice!r} cannot run {config.op} on {config.device} with "
                f"{config.describe()}: {reason}. Choose another with backend=..., "
                f"attn_ops.use_backend(...) or ATTN_OPS_BACKEND, or use 'auto'.")
        return module
    for name in auto_order(config):
        module, reason = _reason(name, config)
        if reason is None:
            return module
    return get_backend_module("reference")


def explain(config: OpConfig) -> dict[str, str]:
    """For each known backend, "ok" or the reason it can't serve ``config``; then, under
    ``"auto"``, the backend "auto" picks and why: what the auto table measured for it (with
    which flash provider, on which GPU) and the table items skipped on this install, e.g.
    ``"flash (fa3_fwd measured 1.62x faster than triton on NVIDIA H200 for this key (...))"``
    or ``"triton (...); flash:fa3_fwd skipped: flash would serve this with aten"``."""
    out = {name: _reason(name, config)[1] or "ok" for name in BACKENDS}
    out["auto"] = _explain_auto(config, out)
    return out


def _explain_auto(config: OpConfig, verdicts: dict[str, str]) -> str:
    from attn_ops import auto_table

    try:
        order = auto_order(config)
    except Exception as e:  # noqa: BLE001 (a CUDA config on a machine without CUDA: say so)
        return f"undecided: {type(e).__name__}: {e}"
    refused = []
    for name in order:
        verdict = verdicts.get(name) or _reason(name, config)[1] or "ok"
        if verdict == "ok":
            break
        refused.append(f"{name} refused: {verdict}")
    else:
        name = "reference"
    text = auto_table.why(config, name) if config.device.type == "cuda" else \
        f"the static order for {config.device.type} devices"
    return f"{name} ({'; '.join([text] + refused)})"


# ---------------------------------------------------------------------------------------------
# The dispatch memo: metadata checks and backend choice, once per call signature
# ---------------------------------------------------------------------------------------------

# The metadata checks and the choice cost ~30 us of Python per eager call (measured on CPU,
# 2026-11-21), more than a decode kernel takes on a GPU. Both depend only on metadata, so their
# outcome is memoised per signature: a serving loop pays them once per batch shape. Failing
# calls are never memoised.
#
# A signature has two parts. The hashable ``signature`` the op builds (op name, scalars, which
# optional tensors were given, the lead tensor's shape) plus the choice in force key a dict;
# each entry holds up to _BUCKET (guard, function) pairs, newest first, where the guard checks
# the metadata of every tensor argument: shape, strides, dtype, device, dispatch keys,
# requires_grad and Python type. The guard is torch's C++ tensor-metadata check (the one
# torch.compile's guards use): ~0.35 us for five tensors where a Python tuple of
# ``(shape, stride(), dtype, device)`` per tensor, hashed and looked up, cost ~2.1 us
# (2026-11-30, development CPU).
_MEMO_LIMIT = 4096
_BUCKET = 8
_memo: dict[Hashable, tuple[tuple[Callable[..., bool], Callable], ...]] = {}


def bind(module: ModuleType, config: OpConfig) -> Callable:
    """``module``'s function for ``config.op``, bound to ``config`` when the backend can."""
    binder = getattr(module, "bind", None)
    return binder(config) if binder is not None else getattr(module, config.op)


# Per op: how many leading arguments every backend function takes positionally, and the names of
# the optional tensors after them, passed as keywords only when given (the contract's growth).
_TRAILING = {"store_kvcache": (5, ("k_scale", "v_scale")),
             "prefill": (12, ("sinks", "k_scale", "v_scale")),
             "decode": (8, ("sinks", "k_scale", "v_scale")),
             "merge_states": (4, ())}


def bind_args(module: ModuleType, config: OpConfig, args: tuple) -> Callable:
    """The function the memo keeps for a call signature: called with the op's own positional
    arguments, all of them (``args``: the first call's, fixing which optional tensors are
    given). A backend with ``bind_args(config, args)`` returns one itself (the Triton backend
    plans the call there); any other backend's function (:func:`bind`) is adapted to its
    calling convention: the leading arguments, the optional tensors given as keywords (both FP8
    scales when either is), ``return_lse=True`` for the ``_with_lse`` ops."""
    binder = getattr(module, "bind_args", None)
    if binder is not None:
        return binder(config, args)
    fn = bind(module, config)
    lead, names = _TRAILING[config.op]
    given = [i for i, a in enumerate(args[lead:]) if a is not None]
    if any(names[i].endswith("_scale") for i in given):
        given = sorted(set(given) | {names.index("k_scale"), names.index("v_scale")})
    keys = tuple((names[i], lead + i) for i in given)
    if config.with_lse and config.op != "merge_states":  # merge_states always returns lse
        keys += (("return_lse", None),)
    if not keys:
        return fn if len(args) == lead else (lambda *a: fn(*a[:lead]))

    def call(*a):
        return fn(*a[:lead], **{name: True if i is None else a[i] for name, i in keys})
    return call


def lookup(signature: Hashable, tensors: tuple) -> Callable | None:
    """The memoised function for this call, or None (then call :func:`decide`).

    ``signature`` must cover every non-tensor input that the checks and the backend choice read
    (the op name included) and which optional tensors were given; ``tensors``: every tensor
    argument given, in a fixed order per ``signature``. The choice in force is added here.
    The ops' kernels inline these lines (a Python frame less per call): keep them alike.
    """
    choice = _CHOICE.get()
    if choice is None:  # the environment's raw value: a dict lookup, no decoding (see env)
        choice = _env_backend_raw()
    for guard, run in _memo.get((choice, signature), ()):
        if guard(*tensors):
            return run
    return None


def decide(signature: Hashable, tensors: tuple, validate: Callable[[], None],
           config: Callable[[], OpConfig], args: tuple | None = None) -> Callable:
    """``validate()``, choose and bind for a call that :func:`lookup` missed; memoise the
    function under ``signature`` and a guard on ``tensors``' metadata.

    ``args``: the call's positional arguments, every one of the op's (default: ``tensors``,
    for an op whose arguments are all tensors); the function returned takes them
    (:func:`bind_args`)."""
    validate()
    choice = _CHOICE.get()
    cfg = config()
    run = bind_args(select(cfg, choice if choice is not None else current_choice()), cfg,
                    tensors if args is None else args)
    key = (choice if choice is not None else _env_backend_raw(), signature)
    bucket = _memo.get(key, ())
    if not bucket and len(_memo) >= _MEMO_LIMIT:
        _memo.clear()
    # A new tuple, never a mutated list: a thread iterating the old bucket is unaffected.
    _memo[key] = ((metadata_guard(tensors), run),) + bucket[:_BUCKET - 1]
    return run


def dispatch(signature: Hashable, tensors: tuple, validate: Callable[[], None],
             config: Callable[[], OpConfig], args: tuple | None = None) -> Callable:
    """:func:`lookup`, then :func:`decide` on a miss (the ops inline this to create the two
    closures only on a miss)."""
    run = lookup(signature, tensors)
    return run if run is not None else decide(signature, tensors, validate, config, args)


def call_under(op: Callable, args: tuple, name: str | None):
    """``op(*args)`` on backend ``name`` (None: the context's choice): ``with use_backend(name)``
    without the object (~0.5 us less per call with ``backend=``, CPU, 2026-11-30)."""
    if name is None:
        return op(*args)
    if name != "auto" and (name not in _imported or name not in BACKENDS):
        use_backend(name)  # fail early on a typo, as the context manager does
    token = _CHOICE.set(name)
    try:
        return op(*args)
    finally:
        _CHOICE.reset(token)


def clear_cache() -> None:
    """Forget memoised choices (after installing a package or changing TRITON_INTERPRET)."""
    _memo.clear()


# ---------------------------------------------------------------------------------------------
# Metadata guards
# ---------------------------------------------------------------------------------------------

def _meta(t):
    return (t.shape, t.stride(), t.dtype, t.device)


def _python_guard(tensors: tuple) -> Callable[..., bool]:
    """The portable guard: the tensors' ``(shape, stride(), dtype, device)`` compared."""
    expected = tuple(map(_meta, tensors))
    return lambda *ts: tuple(map(_meta, ts)) == expected


def _torch_guard(tensors: tuple) -> Callable[..., bool]:
    """torch's C++ check of dispatch keys, Python type, dtype, device, requires_grad, sizes and
    strides (every size and stride static) against ``tensors``'."""
    return _TensorGuards(*tensors, tensor_check_names=[f"t{i}" for i in range(len(tensors))],
                        dynamic_dims_sizes=[list(t.shape) for t in tensors],
                        dynamic_dims_strides=[list(t.stride()) for t in tensors]).check


def _torch_guard_works() -> bool:
    """The private C++ check exists here and rejects every change the checks depend on."""
    import torch
    try:
        a, b = torch.empty(2, 3, 4), torch.empty(3, dtype=torch.int32)
        guard = _torch_guard((a, b))
        same = guard(torch.empty(2, 3, 4), torch.empty(3, dtype=torch.int32))
        changed = (guard(torch.empty(3, 2, 4).transpose(0, 1), b),  # strides only
                   guard(a.to(torch.float64), b), guard(torch.empty(2, 3, 5), b),
                   guard(a, b.to(torch.int64)), guard(a, torch.empty(1, 3, dtype=torch.int32)),
                   guard(torch.empty(4, 3, 2).transpose(0, 2)[:, :, :], b))
        return same is True and not any(changed)
    except Exception:  # noqa: BLE001 (an API that moved or changed: use the portable guard)
        return False


def _aliased_torch_guard(tensors: tuple, source: list[int]) -> Callable[..., bool]:
    """The C++ check for arguments that repeat a tensor object (``k is v``, one cu_seqlens for
    q and k). The check rejects a call that passes one object twice, so it sees each object
    once; the repeats are checked by identity (then their metadata is their first's). One
    generated expression: ~0.4 us less per call than a loop over the repeats and an itemgetter
    (development CPU, 2026-11-30)."""
    keep = [i for i, s in enumerate(source) if s == i]
    check = _torch_guard(tuple(tensors[i] for i in keep))
    params = ", ".join(f"t{i}" for i in range(len(tensors)))
    same = " and ".join(f"t{i} is t{s}" for i, s in enumerate(source) if s != i)
    given = ", ".join(f"t{i}" for i in keep)
    return eval(f"lambda {params}: {same} and check({given})",  # noqa: S307 (our own text)
                {"check": check})


def metadata_guard(tensors: tuple) -> Callable[..., bool]:
    """A function of as many tensors as ``tensors``: True iff their metadata equals theirs
    (and, with torch's check, the same arguments are the same objects)."""
    if _TORCH_GUARD:
        first: dict[int, int] = {}
        source = [first.setdefault(id(t), i) for i, t in enumerate(tensors)]
        try:
            if len(first) == len(tensors):
                return _torch_guard(tensors)
            return _aliased_torch_guard(tensors, source)
        except Exception:  # noqa: BLE001 (symbolic sizes, an unusual tensor: the portable one)
            pass
    return _python_guard(tensors)


try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # a build without dynamo
    _TensorGuards = None
_TORCH_GUARD = _TensorGuards is not None and _torch_guard_works()
