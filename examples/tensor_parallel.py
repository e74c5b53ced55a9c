"""Tensor parallelism: a Llama-style model split over attention heads, served on the attn ops.

:class:`attn_ops.demo.model.DemoLlama` is parallelised with ``torch.distributed.tensor.parallel``
(``ColwiseParallel`` q/k/v/gate/up, ``RowwiseParallel`` o/down, column-parallel LM head;
:func:`attn_ops.distributed.tensor_parallel.llama_tp_plan`). Its q/k/v are DTensors sharded on heads
and its paged caches are ``Shard(2)`` DTensors (:class:`HeadShardedKVCache`), so every
``torch.ops.attn.store_kvcache`` / ``prefill`` / ``decode`` call runs on each rank's heads through
the DTensor rules of :mod:`attn_ops.distributed.sharding`, with no redistribution.

The run: a packed prefill of prompts of different lengths (``store_kvcache`` + paged ``prefill``),
then greedy decode steps padded to a fixed batch (``store_kvcache`` + ``decode``). The same model
on one device, unsharded, runs the same steps; every step's logits are compared, and the
collectives of the prefill and of one decode step are counted (2 all-reduces per layer + 1
all-gather of the logits: an attention call that redistributed would add more).

Run: ``torchrun --nproc-per-node 2 examples/tensor_parallel.py [--device cpu|cuda]`` (gloo on
CPU, NCCL on CUDA). Rank 0 prints one JSON line; exit 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.experimental import implicit_replication
from torch.distributed.tensor.parallel import parallelize_module
from torch.utils._python_dispatch import TorchDispatchMode

from attn_ops.demo.model import DemoConfig, DemoLlama
from attn_ops.distributed.launch import init_from_env
from attn_ops.distributed.tensor_parallel import HeadShardedKVCache, llama_tp_plan

# Relative to the reference logits' largest magnitude. fp32: the row-parallel projections sum
# partial products in another order (~1e-6 seen); bf16: one rounding of ~4e-3 per layer output.
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CountCollectives(TorchDispatchMode):
    """Counts the collectives DTensor issues (the functional c10d ops that communicate)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns, _, name = func._schema.name.partition("::")
        if ns == "_c10d_functional" and name.startswith(("all_", "reduce_", "broadcast")):
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", metavar="PATH", help="rank 0 also writes the checked values here")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--prompts", type=int, nargs="+", default=[13, 29, 6],
                   help="prompt lengths (one sequence each)")
    p.add_argument("--steps", type=int, default=4, help="decode steps")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    return p.parse_args(argv)


def run(args) -> dict:
    device = init_from_env(args.device)
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    dtype = DTYPES[args.dtype]
    cfg = DemoConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                     num_kv_heads=args.kv_heads, intermediate_size=2 * args.hidden)
    # Same seed on every rank: identical full weights, which parallelize_module then splits.
    ref = DemoLlama(cfg, seed=0).to(device, dtype)
    tp = parallelize_module(DemoLlama(cfg, seed=0).to(device, dtype), mesh,
                            llama_tp_plan(cfg.num_layers))

    rows = len(args.prompts)
    max_len = max(args.prompts) + args.steps
    blocks = rows * -(-max_len // args.block_size)
    ref_cache = ref.new_cache(blocks, args.block_size, max_len)
    tp_cache = HeadShardedKVCache(mesh, blocks, args.block_size, cfg.num_kv_heads, cfg.head_dim,
                                  max_seq_len=max_len, num_layers=cfg.num_layers, dtype=dtype,
                                  device=device)

    gen = torch.Generator().manual_seed(1)  # same prompts on every rank
    ids = torch.randint(cfg.vocab_size, (sum(args.prompts),), generator=gen).to(device)
    lengths = dict(enumerate(args.prompts))
    errors, scale = [], 0.0

    def compare(a, b):
        nonlocal scale
        scale = max(scale, b.abs().max().item())
        errors.append((a - b).abs().max().item())

    with torch.inference_mode():
        ref_logits = ref.prefill(ids, ref_cache, ref_cache.prepare_prefill(lengths))
        with implicit_replication(), CountCollectives() as mode:
            tp_logits = tp.prefill(ids, tp_cache, tp_cache.prepare_prefill(lengths))
        prefill_comms = mode.counts
        compare(tp_logits, ref_logits)
        pad = rows + 1  # one padded row: slot -1, seqlens_k 0
        comms = None
        for step in range(args.steps):
            nxt = ref_logits[:rows].argmax(-1)
            tokens = torch.cat([nxt, nxt.new_zeros(pad - rows)])
            ref_logits = ref.decode(tokens, ref_cache, ref_cache.prepare_decode(range(rows), pad))
            batch = tp_cache.prepare_decode(range(rows), pad)
            with implicit_replication(), CountCollectives() as mode:
                tp_logits = tp.decode(tokens, tp_cache, batch)
            comms = comms or mode.counts
            compare(tp_logits[:rows], ref_logits[:rows])

    rel = max(errors) / scale
    expected_comms = 2 * cfg.num_layers + 1
    ok = (rel <= TOL[dtype] and sum(comms.values()) == expected_comms
          and sum(prefill_comms.values()) == expected_comms)
    return {"example": "tensor_parallel", "world": world, "device": device.type,
            "dtype": args.dtype, "steps": len(errors), "max_rel_err": rel, "tol": TOL[dtype],
            "prefill_collectives": prefill_comms, "decode_collectives": comms,
            "expected_collectives": expected_comms, "ok": ok}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
        if dist.get_rank() == 0:
            print(json.dumps(result), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f)
        return 0 if result["ok"] else 1
    finally:
        if dist.is_initialized():
            # Objects still holding the group (the mesh, DTensors in reference cycles) collected
            # while the interpreter is alive, and both ranks at teardown together. Without the
            # collection, the gloo group's last reference went at interpreter exit, and a rank
            # aborted there (std::terminate) in 3 of 40 two-rank CPU runs; with it, 0 of 80.
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
