"""Compile a Triton kernel for sm_90a without a GPU and read its SASS: the machine code ptxas
makes is where a register or scheduling regression shows first (an lse store after a key loop
once cost that loop a spill). Needs the ptxas and cuobjdump that Triton's NVIDIA backend ships;
:func:`available` says whether they are here.

:func:`build` runs the compile in a child process (``python -m tests.support.sass``): a test
session interprets its kernels (``TRITON_INTERPRET=1``, fixed when a kernel module is imported),
and the compiler needs them as compiled ``triton.jit`` functions. :func:`build_hopper_prefill`
does the same for the Gluon Hopper prefill, specialised as a launch of one call shape would
specialise it, and also returns ptxas's performance notes (a serialized wgmma pipeline is one);
:func:`build_hopper_decode` likewise for the Gluon Hopper decode.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field


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
    as (address, instruction) pairs in program order; ``notes``: ptxas's "Potential Performance
    Loss" lines (:func:`build_hopper_prefill` only)."""
    registers: int
    stack: int
    instructions: list[tuple[int, str]]
    notes: list[str] = field(default_factory=list)

    def _spans(self) -> list[tuple[int, int]]:
        """(first, last) instruction index of each loop: a backward branch's target to it."""
        index = {a: i for i, (a, _) in enumerate(self.instructions)}
        spans = []
        for i, (addr, text) in enumerate(self.instructions):
            m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
            if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in index:
                spans.append((index[int(m.group(1), 16)], i))
        return spans

    def loops(self, innermost: bool = False) -> list[list[str]]:
        """The bodies of its loops (from a backward branch's target to the branch); with
        ``innermost``, only those holding no other loop."""
        spans = self._spans()
        if innermost:
            spans = [s for s in spans
                     if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
        return [[t for _, t in self.instructions[lo:hi + 1]] for lo, hi in spans]

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
    return _read(compiled)


def _read(compiled) -> Build:
    """The registers, stack and SASS of a compiled kernel's cubin."""
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


def _ptxas_notes(ptx: str) -> list[str]:
    """ptxas's "Potential Performance Loss" lines for ``ptx`` (sm_90a, verbose)."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([_tool("ptxas"), "-arch=sm_90a", "-v", src, "-o",
                               os.path.join(d, "k.cubin")], capture_output=True, text=True)
    return [line.strip() for line in (done.stdout + done.stderr).splitlines()
            if "Performance Loss" in line]


def compile_hopper_prefill_sm90(batch: int, seqlen: int, causal: bool = True, heads: int = 32,
                                kv_heads: int = 8, head_dim: int = 128, page: int = 0,
                                context: int = 0, n_consumers: int | None = None,
                                pack: int | None = None, min_q: int = 0, sinks: bool = False,
                                lse: bool = False) -> Build:
    """hopper_prefill_kernel for sm_90a as hopper_prefill_launch plans a launch over ``batch``
    prompts of ``seqlen`` queries (bf16; ``page`` > 0: over a paged cache in pages of ``page``,
    ``context`` keys before the queries; ``sinks``, ``lse``: with sinks, writing the lse; a
    132-SM device), specialised on CPU stand-ins of its arguments as a launch specialises on
    the real ones; with ptxas's performance notes."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from attn_ops.backends.triton import common
    common.device_sm_count = lambda device=None: 132  # the H100 / H200 (no device here)
    from attn_ops.backends.triton import hopper_prefill_launch as launch
    from attn_ops.backends.triton import hopper_tma
    from attn_ops.backends.triton.hopper_prefill_kernel import hopper_prefill_kernel as kernel

    keys = seqlen + context
    q = torch.empty(batch * seqlen, heads, head_dim, dtype=torch.bfloat16)
    cu_q = torch.arange(0, batch * seqlen + 1, seqlen, dtype=torch.int32)
    if page:
        width = -(-keys // page)
        k = torch.empty(batch * width, page, kv_heads, head_dim, dtype=torch.bfloat16)
        table = torch.arange(batch * width, dtype=torch.int32).view(batch, width)
        cu_k = torch.arange(0, batch * keys + 1, keys, dtype=torch.int32)
    else:
        k = torch.empty(batch * keys, kv_heads, head_dim, dtype=torch.bfloat16)
        table, cu_k = None, torch.arange(0, batch * keys + 1, keys, dtype=torch.int32)
    n_consumers, pack = launch.form(q, k, cu_q, seqlen, keys, causal, table, min_q, n_consumers,
                                    pack)
    sink = torch.empty(heads) if sinks else None
    out_lse = torch.empty(batch * seqlen, heads) if lse else None
    grid, scalars, consts, shape, blocks = launch._plan(
        q, k, cu_q, cu_k, seqlen, head_dim ** -0.5, causal, q.stride(), table, min_q,
        n_consumers, keys, pack, sink, lse)
    descs = [TensorDescriptor(*hopper_tma.tma_rows(x), [rows, head_dim], layout)
             for x, (rows, layout) in zip((q, k, k), (blocks[0], blocks[1], blocks[1]))]
    flags = torch.empty(shape, dtype=torch.int32)
    args = (*descs, q, cu_q, cu_k, flags, table if table is not None else cu_k,
            *launch.extra_pointers(q, sink, out_lse), *scalars)
    return _compile_gluon(kernel, args, consts)


def _compile_gluon(kernel, args: tuple, consts: dict) -> Build:
    """The Gluon ``kernel`` for sm_90a, specialised on ``args`` (CPU stand-ins) and ``consts``
    as a launch would specialise it, with ptxas's performance notes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(consts, debug=False)
    bound, specialization, parsed = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                             specialization, parsed)
    compiled = triton.compile(GluonASTSource(kernel, signature, constexprs, attrs),
                              target=target, options=options.__dict__)
    out = _read(compiled)
    out.notes = _ptxas_notes(compiled.asm["ptx"])
    return out


def compile_hopper_decode_sm90(batch: int = 16, heads: int = 32, kv_heads: int = 8,
                               head_dim: int = 128, page: int = 16, width: int = 128) -> Build:
    """hopper_decode_kernel for sm_90a as hopper_decode_launch plans a launch over ``batch``
    sequences (bf16, a paged cache in pages of ``page``, tables ``width`` wide; a 132-SM
    device), specialised on CPU stand-ins of its arguments as a launch specialises on the real
    ones."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from attn_ops.backends.triton import hopper_decode_launch as launch
    from attn_ops.backends.triton.hopper_decode_kernel import hopper_decode_kernel as kernel

    q = torch.empty(batch, heads, head_dim, dtype=torch.bfloat16)
    cache = torch.empty(batch * width, page, kv_heads, head_dim, dtype=torch.bfloat16)
    lengths = torch.empty(batch, dtype=torch.int32)
    table = torch.empty(batch, width, dtype=torch.int32)
    progs = launch.programs(batch, kv_heads, 132, width * page)
    descs, scalars, consts = launch._plan(q, cache, cache, lengths, table, head_dim ** -0.5,
                                          q.stride(), progs)
    k_desc, v_desc = (TensorDescriptor(cache, *d) for d in descs)
    slots = progs * 2 * (heads // kv_heads)
    args = (k_desc, v_desc, q, q, torch.empty(slots, head_dim), torch.empty(slots), lengths,
            lengths, table, *scalars)
    return _compile_gluon(kernel, args, consts)


def build(kernel: str, pointers: dict[str, str], constexprs: dict, aligned: set[str],
          **options) -> Build:
    """:func:`compile_sm90` of ``kernel`` (``"module:name"``) in a child process with the
    interpreter off (about 5 s per build)."""
    return _child(dict(kernel=kernel, pointers=pointers, constexprs=constexprs,
                       aligned=sorted(aligned), options=options))


def build_hopper_prefill(**form) -> Build:
    """:func:`compile_hopper_prefill_sm90` of ``form`` in a child process (about 10 s)."""
    return _child(dict(hopper_prefill=form))


def build_hopper_decode(**form) -> Build:
    """:func:`compile_hopper_decode_sm90` of ``form`` in a child process (about 5 s)."""
    return _child(dict(hopper_decode=form))


def _child(spec: dict) -> Build:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-m", "tests.support.sass", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return Build(**json.loads(done.stdout.splitlines()[-1]))


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    if "hopper_prefill" in spec:
        out = compile_hopper_prefill_sm90(**spec["hopper_prefill"])
    elif "hopper_decode" in spec:
        out = compile_hopper_decode_sm90(**spec["hopper_decode"])
    else:
        module, name = spec["kernel"].split(":")
        fn = getattr(importlib.import_module(module), name)
        out = compile_sm90(fn, spec["pointers"], spec["constexprs"], set(spec["aligned"]),
                           **spec["options"])
    print(json.dumps(asdict(out)))
