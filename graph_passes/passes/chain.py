"""Run several custom graph passes in one Inductor slot (torch 2.11 takes a single callable).

A ``_Chain`` is itself a ``CustomGraphPass`` whose ``uuid()`` combines its members'; when any
member has no uuid (a plain function), the chain has none either, and Inductor then bypasses
its FX graph cache rather than risk serving a wrong artifact.
"""

from __future__ import annotations

import hashlib

from torch._inductor.custom_graph_pass import CustomGraphPass


class _Chain(CustomGraphPass):
    def __init__(self, passes):
        self.passes = tuple(passes)

    def __call__(self, graph) -> None:
        for p in self.passes:
            p(graph)

    def uuid(self):
        h = hashlib.sha256()
        for p in self.passes:
            u = p.uuid() if isinstance(p, CustomGraphPass) else None
            if u is None:
                return None
            h.update(repr(u).encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"chain{self.passes!r}"


def members(existing) -> list:
    """The passes in an Inductor pass slot (None, one pass, a list/tuple, or a chain)."""
    if existing is None:
        return []
    if isinstance(existing, _Chain):
        return list(existing.passes)
    if isinstance(existing, (list, tuple)):
        out = []
        for p in existing:
            out.extend(members(p))
        return out
    return [existing]


def chain(existing, ours):
    """``existing`` then ``ours``; a pass of the same class as ``ours`` already there is dropped."""
    passes = [p for p in members(existing) if type(p) is not type(ours)] + [ours]
    return passes[0] if len(passes) == 1 else _Chain(passes)
