"""The base of every substitution pass: a ``CustomGraphPass`` whose ``uuid()`` keeps caches right.

Inductor's FX graph cache keys an artifact by the uuids of the custom passes in force. Ours
covers everything a pass's output depends on: the source of this package and of the attn_ops
modules its decisions read (checks, registry, ops, contract, the auto table's loader and every
backend module, whose ``supports()`` the eligibility asks), the data those decisions read at
compile time (the auto table in force, the environment variables the backends' ``supports()``
read, which optional kernel packages are installed), the options, the attn backend choice in
force when compiling, and whether gradients are enabled (the ops are inference-only). So an
artifact compiled under other decisions (no substitution, another table, other options) is
never served to a compile that would decide otherwise, and back.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

import attn_ops
from attn_ops import registry
from graph_passes.options import SubstitutionOptions


def source_files() -> list[str]:
    """The files whose source the passes' decisions depend on."""
    package = Path(__file__).parents[1]  # graph_passes/, every subfolder included
    ops_dir = Path(attn_ops.__file__).parent
    files = sorted(str(p) for p in package.rglob("*.py"))
    files += [str(ops_dir / n) for n in ("checks.py", "registry.py", "ops.py", "contract.py",
                                         "auto_table.py", "env.py")]
    # Every backend's supports() (and what it calls) can turn a substitution on or off.
    files += sorted(str(p) for p in (ops_dir / "backends").rglob("*.py"))
    return files


@functools.lru_cache(maxsize=1)
def _source_hash() -> bytes:
    return get_hash_for_files(tuple(source_files()))


# Environment variables that a backend's supports() or the auto table's loader reads.
_DECISION_ENV = ("TRITON_INTERPRET", "ATTN_OPS_AUTO_TABLE", "ATTN_OPS_FLASH_IMPL")
# Optional packages whose presence makes a backend (or a flash provider) able to serve a call.
_OPTIONAL_PACKAGES = ("triton", "flash_attn", "flash_attn_interface", "fa3_fwd_interface",
                      "torch_npu")


def decision_data() -> str:
    """What the decisions read besides source: the auto table in force (its parsed content,
    so an edited or swapped table counts even when the path is the same), the environment, and
    the optional packages installed. Not cached: each compile asks afresh (~0.1 ms)."""
    from attn_ops import auto_table
    table = auto_table.load(os.environ.get("ATTN_OPS_AUTO_TABLE") or None)
    env = {name: os.environ.get(name) for name in _DECISION_ENV}
    installed = {name: importlib.util.find_spec(name) is not None for name in _OPTIONAL_PACKAGES}
    return json.dumps({"table": table, "env": env, "installed": installed}, sort_keys=True)


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
        h.update(decision_data().encode())
        choice = self.options.backend_choice or registry.current_choice()
        h.update(f"{self.name}|{self.options.key()}|backend={choice}|"
                 f"grad={torch.is_grad_enabled()}|torch={torch.__version__}".encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"
