"""``torch.compile(model, backend="attn_ops")``: Inductor plus the attention substitution passes.

Registered through the ``torch_dynamo_backends`` entry point of the package, so the string
works without importing anything. Options come through ``torch.compile(..., options=...)``:
keys prefixed ``attn_ops.`` configure the substitution (see :class:`SubstitutionOptions`), every
other key is an Inductor option, as with ``backend="inductor"``::

    torch.compile(model, backend="attn_ops",
                  options={"attn_ops.attn_backend": "triton", "max_autotune": False})

The passes reach Inductor as ``config_patches`` of this compile only (global Inductor config is
not touched); a custom pass the user already installed in the same slot still runs first.
When an attn backend is named, the compiled callable runs inside ``attn_ops.use_backend`` of
it, since the op picks its backend when it runs, not when it is traced.
"""

from __future__ import annotations

from typing import Any

import torch

from graph_passes.options import SubstitutionOptions, split_options
from graph_passes.passes.chain import chain
from graph_passes.passes.handwritten_attention import HandwrittenAttentionPass
from graph_passes.passes.sdpa_to_prefill import SdpaToPrefillPass


def pass_config_patches(options: SubstitutionOptions) -> dict[str, Any]:
    """Inductor config patches that install our passes after any the user already set."""
    cfg = torch._inductor.config
    return {
        "pre_grad_custom_pass": chain(cfg.pre_grad_custom_pass, SdpaToPrefillPass(options)),
        "joint_custom_pre_pass": chain(cfg.joint_custom_pre_pass,
                                       HandwrittenAttentionPass(options)),
    }


def _with_backend(compiled, backend: str):
    """Run ``compiled`` with the attn ops on ``backend`` (keeps Dynamo's calling convention)."""
    from attn_ops.registry import use_backend

    def run(*args):
        with use_backend(backend):
            return compiled(*args)
    run._boxed_call = getattr(compiled, "_boxed_call", False)
    return run


def attn_ops_backend(gm: torch.fx.GraphModule, example_inputs, *, options: dict | None = None,
                     mode: str | None = None):
    """A Dynamo backend: Inductor with attention substituted by ``torch.ops.attn.prefill``.

    Args:
        gm, example_inputs: what Dynamo passes to every backend.
        options: ``attn_ops.*`` substitution options plus Inductor options.
        mode: an Inductor mode ("default", "reduce-overhead", "max-autotune", ...).
    """
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    subst, inductor_options = split_options(options)
    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(inductor_options)
    patches.update(pass_config_patches(subst))
    compiled = compile_fx(gm, example_inputs, config_patches=patches)
    if subst.backend_choice is not None:
        return _with_backend(compiled, subst.backend_choice)
    return compiled
