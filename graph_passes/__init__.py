"""Automatic attention substitution: ordinary PyTorch / Hugging Face attention -> ``attn.prefill``.

* ``torch.compile(model, backend="attn_ops")`` -- Inductor plus the passes (no import needed:
  registered through the ``torch_dynamo_backends`` entry point). Options through
  ``torch.compile(..., options={"attn_ops.<field>": value, ...})``; see
  :class:`SubstitutionOptions`.
* :func:`enable` / :func:`disable` (or ``with graph_passes.enabled(): ...``) -- make a plain
  ``torch.compile(model)`` substitute too; :func:`disable` restores Inductor's config exactly.
* :func:`substitute_attention` -- the same substitution on a ``torch.export`` ExportedProgram or
  GraphModule.

What is substituted and what is left alone (and why) is in docs/graph_passes.md. Every
substitution is counted in ``torch._dynamo.utils.counters["graph_passes"]``; every call left
alone is logged at debug level on the ``graph_passes`` logger with its reason.
"""

from graph_passes.compile_backend import attn_ops_backend
from graph_passes.global_config import disable, enable, enabled, is_enabled
from graph_passes.options import SubstitutionOptions
from graph_passes.passes.export import substitute_attention
from graph_passes.passes.handwritten_attention import HandwrittenAttentionPass
from graph_passes.passes.sdpa_to_prefill import SdpaToPrefillPass

__all__ = [
    "attn_ops_backend", "substitute_attention", "enable", "disable", "enabled", "is_enabled",
    "SubstitutionOptions", "SdpaToPrefillPass", "HandwrittenAttentionPass",
]
