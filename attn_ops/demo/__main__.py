"""``python -m attn_ops.demo``: the command line of the demo (see :mod:`attn_ops.demo`)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from attn_ops import registry
from attn_ops.demo.job import DTYPES, DemoError, run
from attn_ops.demo.report import print_summary


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m attn_ops.demo",
        description="Compile a small Llama-style model with torch.compile(backend='attn_ops'), "
                    "serve prompts with a paged KV cache and continuous batching, and check "
                    "both against the eager model. Exit 0: checks passed, 1: a check failed, "
                    "2: device or backend unavailable.")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda[:i] or npu[:i]")
    p.add_argument("--backend", default="auto", choices=["auto", *registry.BACKENDS],
                   help="attention backend for every attn op (default: auto per device)")
    p.add_argument("--steps", type=int, default=16,
                   help="new tokens of the longest request (others get fewer); default 16")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="model dtype; auto = float32 on cpu, bfloat16 on accelerators")
    p.add_argument("--seed", type=int, default=0, help="weights and prompts (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the demo's matmuls are tiny)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile step")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 a check failed, 2 unavailable)."""
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        report = run(device=args.device, backend=args.backend, steps=args.steps,
                     dtype=args.dtype, seed=args.seed, compile_model=not args.no_compile,
                     progress=not args.no_progress, threads=args.threads)
    except DemoError as e:
        print(f"attn_ops demo: {e}", file=sys.stderr)
        return 2
    report["total_s"] = time.perf_counter() - start
    print_summary(report, sys.stdout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
