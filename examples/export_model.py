"""Export a model that uses the attn ops, save it, load it, compile it ahead of time, serve with it.

The model is the small attention layer of ``paged_attention_model.py`` (beside this file): Q/K/V/O
projections around ``torch.ops.attn.*``, its paged KV cache held in module buffers. Random hidden
states stand in for a real model's embeddings. The walk-through:

1. Build the layer around a :class:`attn_ops.PagedKVCache`'s tensors (the planner hands out slots
   and block tables; the layer writes the tensors).
2. ``torch.export`` its prefill and decode steps with a dynamic token count, batch and block-table
   width, and show what the graph holds: the attn ops, kept whole by ``run_decompositions()``,
   and the cache writes as buffer mutations.
3. ``torch.export.save`` both programs to ``.pt2`` files and ``torch.export.load`` them. The
   loading process must ``import attn_ops`` first; without it torch stops with "We failed to
   resolve torch.ops.attn.store_kvcache.default to an operator ... Please import the custom op
   to register it before deserializing."
4. AOTInductor: ``aoti_compile_and_package`` the decode step (the per-token hot path), load the
   package and bind it to the same cache tensors, without a copy.
5. Serve two prompts: prefill through the loaded exported program, then decode steps (batch
   padded to 4 rows, as a CUDA graph would need) through the AOTInductor package. Every step is
   checked against eager mode on the reference backend; the cache both routes wrote is checked
   too.

Run: ``python examples/export_model.py [--device cpu|cuda] [--out DIR] [--json REPORT]``.
About 30 s on a 2-core CPU, most of it the C++ compile of step 4. Exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import attn_ops  # registers torch.ops.attn.*: needed before torch.export.load / aoti_load_package
from attn_ops import PagedKVCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paged_attention_model as pam  # noqa: E402

# fp32 end to end. On CUDA a Triton kernel may run fp32 dots as TF32 (10-bit mantissa).
TOL = {"cpu": 1e-4, "cuda": 5e-3}
DECODE_ROWS = 4  # decode batch padded to a fixed row count (slot -1, length 0 on padded rows)


def build(device: str):
    """The layer bound to a planner's caches, and an eager twin on copies of the same state."""
    cfg = pam.LayerConfig(num_blocks=32, block_size=4)
    planner = PagedKVCache(cfg.num_blocks, cfg.block_size, cfg.num_kv_heads, cfg.head_dim,
                           max_seq_len=32, dtype=cfg.dtype, device=device)
    torch.manual_seed(0)
    layer = pam.PagedAttention(cfg, planner.k_cache(), planner.v_cache()).to(device)
    twin = pam.PagedAttention(cfg, planner.k_cache().clone(), planner.v_cache().clone())
    twin.load_state_dict({k: v for k, v in layer.state_dict().items() if "cache" not in k},
                         strict=False)
    return cfg, planner, layer, twin.to(device)


def export_steps(layer, planner, cfg, device):
    """Step 2. Example inputs come from a throw-away planner: exporting reads no data."""
    scratch = PagedKVCache(cfg.num_blocks, cfg.block_size, cfg.num_kv_heads, cfg.head_dim,
                           max_seq_len=planner.max_seq_len, dtype=cfg.dtype, device=device)
    examples = {
        "prefill": pam.prefill_inputs(scratch.prepare_prefill({0: 3, 1: 2}),
                                      torch.randn(5, cfg.hidden, device=device)),
        "decode": pam.decode_inputs(scratch.prepare_decode([0, 1]),
                                    torch.randn(2, cfg.hidden, device=device)),
    }
    programs = {}
    for kind, step in (("prefill", pam.PrefillStep(layer)), ("decode", pam.DecodeStep(layer))):
        programs[kind] = torch.export.export(step, examples[kind],
                                             dynamic_shapes=pam.dynamic_shapes(step))
    return programs


def describe(ep) -> dict:
    """What a reader should look at in an exported program."""
    lowered = ep.run_decompositions()
    ops = [str(n.target) for n in lowered.graph.nodes
           if n.op == "call_function" and "attn" in str(n.target)]
    ops += [str(n.args[0]) for n in lowered.graph.nodes
            if n.op == "call_function" and "auto_functionalized" in str(n.target)]
    dynamic = {n.name: [i for i, size in enumerate(n.meta["val"].shape)
                        if isinstance(size, torch.SymInt)]
               for n in ep.graph.nodes if n.name in ep.graph_signature.user_inputs}
    return {"attn_ops": sorted(set(ops)),
            "buffer_mutations": sorted(lowered.graph_signature.buffers_to_mutate.values()),
            "dynamic_dims": dynamic}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="folder for the .pt2 files (default: a temporary one)")
    parser.add_argument("--json", help="write the checked values to this file")
    args = parser.parse_args()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        return run(args, Path(args.out))
    with tempfile.TemporaryDirectory(prefix="attn_ops_export_") as folder:
        return run(args, Path(folder))


def run(args, out: Path) -> int:
    device, report = args.device, {"device": args.device}

    # 1-2. Build and export.
    cfg, planner, layer, twin = build(device)
    programs = export_steps(layer, planner, cfg, device)
    report["programs"] = {kind: describe(ep) for kind, ep in programs.items()}
    for kind, info in report["programs"].items():
        print(f"{kind}: {info['attn_ops']}, writes {info['buffer_mutations']}")

    # 3. Save and load. (torch.export.save stores the buffers' current contents too.)
    for kind, ep in programs.items():
        torch.export.save(ep, out / f"{kind}.pt2")
    prefill = torch.export.load(out / "prefill.pt2").module()
    # The loaded program has its own copy of the caches; point it at the planner's (no copy).
    prefill.load_state_dict({"layer.k_cache": planner.k_cache(),
                             "layer.v_cache": planner.v_cache()}, strict=False, assign=True)

    # 4. AOTInductor.
    start = time.perf_counter()
    package = torch._inductor.aoti_compile_and_package(
        programs["decode"], package_path=str(out / "decode_aoti.pt2"),
        # -O0 applies to the C++ wrapper only (kernels keep -O3): on a 2-core CPU it halves
        # the compile (24 s instead of 43 s) and the wrapper's speed does not matter here.
        inductor_configs={"aot_inductor.compile_wrapper_opt_level": "O0"}
        if hasattr(torch._inductor.config.aot_inductor, "compile_wrapper_opt_level") else {})
    report["aoti_compile_s"] = round(time.perf_counter() - start, 1)
    decode = torch._inductor.aoti_load_package(package)
    pam.bind_aoti_caches(decode, planner.k_cache(), planner.v_cache())

    # 5. Serve, checking each step against the eager twin on the reference backend.
    errors = []

    def check(name, got, twin_step, step_args):
        with attn_ops.use_backend("reference"):
            want = twin_step(*step_args)
        errors.append((name, (got - want).abs().max().item()))

    with torch.no_grad():
        batch = planner.prepare_prefill({"a": 7, "b": 4})
        step_args = pam.prefill_inputs(batch, torch.randn(11, cfg.hidden, device=device))
        check("prefill", prefill(*step_args), twin.prefill, step_args)
        for i in range(5):
            batch = planner.prepare_decode(["a", "b"], pad_to=DECODE_ROWS)
            step_args = pam.decode_inputs(batch, torch.randn(DECODE_ROWS, cfg.hidden,
                                                             device=device))
            check(f"decode {i}", decode(*step_args), twin.decode, step_args)
    errors.append(("k_cache", (planner.k_cache() - twin.k_cache).abs().max().item()))
    errors.append(("v_cache", (planner.v_cache() - twin.v_cache).abs().max().item()))

    tol = TOL[torch.device(device).type]
    worst = max(err for _, err in errors)
    report.update(ok=worst <= tol, max_err=worst, tol=tol, checks=dict(errors),
                  lengths={s: planner.num_cached(s) for s in ("a", "b")}, files=sorted(
                      p.name for p in out.glob("*.pt2")))
    for name, err in errors:
        print(f"{name:>9}: max |exported - eager| = {err:.2e}")
    print(f"{'ok' if report['ok'] else 'MISMATCH'} (tolerance {tol:g}); wrote {report['files']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
