"""The house rules that a reader relies on: small files, imports in one direction, no cycles."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("attn_ops", "graph_passes")
MAX_LINES = 450


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _module_level_imports(path: pathlib.Path, known: set[str]) -> set[str]:
    """Modules of ours imported at module level (imports inside functions are lazy by design)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_no_library_file_is_longer_than_a_reader_holds():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these along a seam a reader would recognise: {long}"


def test_module_level_imports_have_no_cycle():
    modules = _modules()
    graph = {m: _module_level_imports(p, set(modules)) - {m} for m, p in modules.items()}
    # A package's __init__ importing its own submodules is not a cycle a reader trips over.
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_the_library_never_imports_the_passes():
    """graph_passes builds on attn_ops; attn_ops (but its demo) stands without graph_passes."""
    modules = _modules()
    offenders = sorted(m for m, p in modules.items()
                       if m.startswith("attn_ops") and not m.startswith("attn_ops.demo")
                       and any(d.startswith("graph_passes")
                               for d in _module_level_imports(p, set(modules))))
    assert not offenders


# docs/DESIGN.md's tree, top to bottom: a module imports (at module level) only what is above it.
LAYERS = ("attn_ops.env", "attn_ops.contract", "attn_ops.checks", "attn_ops.registry",
          "attn_ops.auto_table", "attn_ops.ops", "attn_ops.api", "attn_ops.paged_cache",
          "attn_ops.hf", "attn_ops.backends", "attn_ops.distributed", "attn_ops.demo",
          "graph_passes")


def _layer(name: str) -> int:
    return max((i for i, top in enumerate(LAYERS) if name == top or name.startswith(top + ".")),
               default=-1)


def test_imports_point_up_the_tree_of_the_design_doc():
    modules = _modules()
    upward = sorted(f"{m} -> {d}" for m, p in modules.items() if m != "attn_ops"
                    for d in _module_level_imports(p, set(modules)) if _layer(d) > _layer(m))
    assert not upward, "imports against the direction of docs/DESIGN.md's tree: " + str(upward)
