"""Compile a Triton kernel for sm_90a without a GPU and read its SASS: the machine code ptxas
makes is where a register or scheduling regression shows first (an lse store after a key loop
once cost that loop a spill). Needs the ptxas and cuobjdump that Triton's NVIDIA backend ships;
:func:`available` says whether they are here.

:func:`build` runs the compile in a child process (``python -m tests.support.sass``): a test
session interprets its kernels (``TRITON_INTERPRET=1``, fixed when a kernel module is imported),
and the compiler needs them as compiled ``triton.jit`` functions.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def available() -> bool:
    """Triton with its NVIDIA backend's ptxas and cuobjdump (no GPU needed)."""
    try:
        return all(os.access(_tool(n), os.X_OK) for n in ("ptxas", "cuobjdump"))
    except ImportError:
        return False


@dataclass
class Build:
    """One compiled kernel: registers per thread, local memory (spill stack) bytes, and its SASS
    as (address, instruction) pairs in program order."""
    registers: int
    stack: int
    instructions: list[tuple[int, str]]

    def loops(self) -> list[list[str]]:
        """The bodies of its loops (from a backward branch's target to the branch)."""
        index = {a: i for i, (a, _) in enumerate(self.instructions)}
        bodies = []
        for i, (addr, text) in enumerate(self.instructions):
            m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
            if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in index:
                bodies.append([t for _, t in self.instructions[index[int(m.group(1), 16)]:i + 1]])
        return bodies

    def key_loop(self) -> list[str]:
        """The loop that issues the asynchronous K/V copies (LDGSTS): the key walk."""
        walks = [b for b in self.loops() if any("LDGSTS" in t for t in b)]
        assert len(walks) == 1, f"{len(walks)} loops issue K/V copies"
        return walks[0]


def compile_sm90(kernel, pointers: dict[str, str], constexprs: dict, aligned: set[str],
                 **options) -> Build:
    """``kernel`` (a ``triton.jit`` function) for sm_90a: ``pointers`` maps each pointer
    argument to its Triton type (``"*bf16"``), every other non-constexpr argument is an i32
    (fp32 where its name says scale or cap), ``aligned`` the arguments specialised as multiples
    of 16 (as Triton does at a launch with aligned pointers and strides); ``options``:
    num_warps, num_stages, maxnreg."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if re.search(r"scale|cap_", name) else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n in pointers or n in aligned}
    source = ASTSource(kernel, signature, attrs=attrs,
                       constexprs={(names.index(n),): v for n, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    instructions = [(int(a, 16), t.strip()) for a, t in
                    re.findall(r"/\*([0-9a-f]{4,})\*/\s*([^;]*);", sass)]
    return Build(int(re.search(r"REG:(\d+)", usage).group(1)),
                 int(re.search(r"STACK:(\d+)", usage).group(1)), instructions)


def build(kernel: str, pointers: dict[str, str], constexprs: dict, aligned: set[str],
          **options) -> Build:
    """:func:`compile_sm90` of ``kernel`` (``"module:name"``) in a child process with the
    interpreter off (about 5 s per build)."""
    spec = dict(kernel=kernel, pointers=pointers, constexprs=constexprs, aligned=sorted(aligned),
                options=options)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-m", "tests.support.sass", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return Build(**json.loads(done.stdout.splitlines()[-1]))


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    module, name = spec["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    out = compile_sm90(fn, spec["pointers"], spec["constexprs"], set(spec["aligned"]),
                       **spec["options"])
    print(json.dumps(asdict(out)))
