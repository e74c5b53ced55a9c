"""The base of every substitution pass: a ``CustomGraphPass`` whose ``uuid()`` keeps caches right.

Inductor's FX graph cache keys an artifact by the uuids of the custom passes in force. Ours
covers everything a pass's output depends on: the source of this package and of the attn_ops
modules its decisions read (checks, registry, ops), the options, the attn backend choice in
force when compiling (decisions ask that backend's ``supports()``), and whether gradients are
enabled (the ops are inference-only). So an artifact compiled without substitution (or with
other options) is never served to a compile with it, and back.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

import attn_ops
from attn_ops import registry
from graph_passes.options import SubstitutionOptions


@functools.lru_cache(maxsize=1)
def _source_hash() -> bytes:
    package = Path(__file__).parents[1]  # graph_passes/, every subfolder included
    ops_dir = Path(attn_ops.__file__).parent
    files = sorted(str(p) for p in package.rglob("*.py"))
    files += [str(ops_dir / n) for n in ("checks.py", "registry.py", "ops.py")]
    return get_hash_for_files(tuple(files))


class AttentionPass(CustomGraphPass):
    """A graph pass configured by :class:`SubstitutionOptions`; subclasses implement ``run``."""

    name = "attention_pass"

    def __init__(self, options: SubstitutionOptions | dict | None = None):
        self.options = SubstitutionOptions.coerce(options)

    def run(self, graph: torch.fx.Graph) -> int:
        """Rewrite ``graph`` in place; return the number of substitutions."""
        raise NotImplementedError

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.run(graph)

    def uuid(self) -> str:
        h = hashlib.sha256(_source_hash())
        choice = self.options.backend_choice or registry.current_choice()
        h.update(f"{self.name}|{self.options.key()}|backend={choice}|"
                 f"grad={torch.is_grad_enabled()}|torch={torch.__version__}".encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"
