"""Explicit opt-in: make a plain ``torch.compile(model)`` substitute attention, with an exact undo.

This is the only place that writes global Inductor config, and only on request::

    handle = graph_passes.enable()           # or enable({"handwritten": False}), ...
    model = torch.compile(model)             # Inductor now runs our passes too
    ...
    handle.undo()                            # config is exactly as before enable()

    with graph_passes.enabled(attn_backend="triton"):   # enable + undo, and within the block
        out = torch.compile(model)(x)        # the attn ops also run on that backend

:func:`enable` chains our passes after any custom pass already installed in the same Inductor
slots (``pre_grad_custom_pass``, ``joint_custom_pre_pass``) and remembers the previous values;
undo puts those exact objects back. Undos must come in reverse order of enables: undoing a
handle whose passes were since replaced raises instead of clobbering someone else's config.
Functions Dynamo already compiled keep their code: enable before the first call (or call
``torch._dynamo.reset()``).
"""

from __future__ import annotations

import contextlib

import torch

from graph_passes.compile_backend import pass_config_patches
from graph_passes.options import SubstitutionOptions
from graph_passes.passes.chain import members
from graph_passes.passes.sdpa_to_prefill import SdpaToPrefillPass

_SLOTS = ("pre_grad_custom_pass", "joint_custom_pre_pass")


class SubstitutionHandle:
    """What :func:`enable` returns: ``undo()`` restores Inductor's config exactly."""

    def __init__(self, options: SubstitutionOptions, previous: dict, installed: dict):
        self.options, self._previous, self._installed = options, previous, installed
        self.active = True

    def undo(self) -> None:
        if not self.active:
            return
        cfg = torch._inductor.config
        for slot in _SLOTS:
            if getattr(cfg, slot) is not self._installed[slot]:
                raise RuntimeError(
                    f"graph_passes: cannot undo: torch._inductor.config.{slot} was changed "
                    f"after enable() (undo later enables first)")
        for slot in _SLOTS:
            setattr(cfg, slot, self._previous[slot])
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()


def enable(options: SubstitutionOptions | dict | None = None, **fields) -> SubstitutionHandle:
    """Install the passes in global Inductor config; returns the handle that undoes it.

    Args:
        options: :class:`SubstitutionOptions` or a dict of its fields.
        **fields: fields of :class:`SubstitutionOptions` (``sdpa=False``, ...).
    """
    opts = SubstitutionOptions.coerce(options)
    if fields:
        opts = SubstitutionOptions(**{**opts.__dict__, **fields})
    cfg = torch._inductor.config
    previous = {slot: getattr(cfg, slot) for slot in _SLOTS}
    installed = pass_config_patches(opts)
    for slot in _SLOTS:
        setattr(cfg, slot, installed[slot])
    return SubstitutionHandle(opts, previous, installed)


def disable(handle: SubstitutionHandle) -> None:
    """Undo :func:`enable` (same as ``handle.undo()``)."""
    handle.undo()


@contextlib.contextmanager
def enabled(options: SubstitutionOptions | dict | None = None, **fields):
    """``enable`` for the block, then undo; the attn ops run on ``attn_backend`` if one is named."""
    handle = enable(options, **fields)
    try:
        if handle.options.backend_choice is not None:
            from attn_ops.registry import use_backend
            with use_backend(handle.options.backend_choice):
                yield handle
        else:
            yield handle
    finally:
        handle.undo()


def is_enabled() -> bool:
    """True when a plain ``torch.compile`` would currently run the SDPA substitution."""
    return any(isinstance(p, SdpaToPrefillPass)
               for p in members(torch._inductor.config.pre_grad_custom_pass))
