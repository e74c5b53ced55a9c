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

Otherwise (static shapes, ``attn_ops.inline_triton`` on) the graph is compiled once per attn
backend choice (``use_backend`` / ``ATTN_OPS_BACKEND`` / "auto") in force when it is called: the
choice is fixed inside each compile, so calls that Triton serves are inlined as Triton kernels
Inductor launches itself (:mod:`graph_passes.lowering.inline_triton`), and the compiled
callable picks its artifact by the choice in force (a dict lookup per graph call; a new choice
compiles a new artifact, from the pristine graph, with the call's inputs).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from graph_passes.lowering.inline_triton import InlineTritonPass
from graph_passes.options import SubstitutionOptions, split_options
from graph_passes.passes.chain import chain
from graph_passes.passes.handwritten_attention import HandwrittenAttentionPass
from graph_passes.passes.sdpa_to_prefill import SdpaToPrefillPass

log = logging.getLogger("graph_passes")


def pass_config_patches(options: SubstitutionOptions, choice: str | None = None
                        ) -> dict[str, Any]:
    """Inductor config patches that install our passes after any the user already set.

    ``choice``: the attn backend choice this compile is for; with it (and
    ``options.inline_triton``) calls Triton serves are inlined as Triton kernels.
    """
    cfg = torch._inductor.config
    pre = chain(cfg.pre_grad_custom_pass, SdpaToPrefillPass(options))
    extra = {}
    if choice is not None and options.inline_triton:
        pre = chain(pre, InlineTritonPass(options, choice))
        if hasattr(cfg, "_use_fp64_for_unbacked_floats"):
            # Inductor types Python float kernel arguments as fp64 by default; Triton's JIT
            # (which our kernels are written for) types them fp32. With fp64 the decode kernel's
            # scores, hence its accumulator, became fp64 and tl.dot refused the accumulator
            # (H200, torch 2.11: the split-KV kernel failed to compile inline).
            extra["_use_fp64_for_unbacked_floats"] = False
    return {
        **extra,
        "pre_grad_custom_pass": pre,
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

    from attn_ops.registry import current_choice

    subst, inductor_options = split_options(options)
    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(inductor_options)
    if subst.backend_choice is not None:
        patches.update(pass_config_patches(subst, subst.backend_choice))
        compiled = compile_fx(gm, example_inputs, config_patches=patches)
        return _with_backend(compiled, subst.backend_choice)
    if not subst.inline_triton or _symbolic(example_inputs):
        patches.update(pass_config_patches(subst))
        return compile_fx(gm, example_inputs, config_patches=patches)
    pristine = copy.deepcopy(gm.graph)

    def compile_for(choice: str, inputs):
        module = gm if not per_choice else torch.fx.GraphModule(gm, copy.deepcopy(pristine))
        try:
            return compile_fx(module, inputs, config_patches={
                **patches, **pass_config_patches(subst, choice)})
        except Exception as e:  # noqa: BLE001 (a kernel Inductor could not compile)
            # Inductor compiles the inlined kernels itself; where it fails (a kernel written for
            # Triton's JIT that Inductor's compile rejects), the attn ops stay extern calls:
            # slower, never wrong.
            log.warning("attn_ops: inlining the Triton kernels failed (%s: %s); compiling with "
                        "the attn ops as extern calls", type(e).__name__, str(e)[:200])
            module = torch.fx.GraphModule(gm, copy.deepcopy(pristine))
            return compile_fx(module, inputs, config_patches={**patches,
                                                              **pass_config_patches(subst)})

    per_choice: dict[str, Any] = {}
    choice = current_choice()
    per_choice[choice] = compile_for(choice, example_inputs)
    return _per_choice(per_choice, compile_for, current_choice)


def _symbolic(example_inputs) -> bool:
    """Any input with a symbolic size or stride (a dynamic-shape compile)."""
    for x in example_inputs:
        if isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and any(
                isinstance(s, torch.SymInt) for s in (*x.shape, *x.stride()))):
            return True
    return False


def _per_choice(per_choice: dict, compile_for, current_choice):
    """The callable that runs the artifact of the attn backend choice in force (compiling it
    from the call's inputs the first time a choice is seen): the compiled graph's guard on the
    choice. Keeps Inductor's calling convention (boxed: one list of inputs)."""
    (first,) = per_choice.values()

    def run(*args):
        choice = current_choice()
        fn = per_choice.get(choice)
        if fn is None:
            boxed_call = len(args) == 1 and isinstance(args[0], list)  # one list, cleared by fn
            inputs = list(args[0] if boxed_call else args)
            fn = per_choice[choice] = compile_for(choice, inputs)
        return fn(*args)
    run._boxed_call = getattr(first, "_boxed_call", False)
    run.artifacts = per_choice  # tests read which choices were compiled
    return run
