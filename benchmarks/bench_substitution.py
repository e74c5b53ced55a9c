"""Compiled with vs without attention substitution, on a small Llama-style model, at prefill sizes.

Both contenders are timed in the same process on the same inputs:

* ``inductor``: ``torch.compile(model)`` -- Inductor lowers the model's attention as written
  (SDPA -> the fused CPU / flash kernel; hand-written -> its own fusions);
* ``attn_ops``: ``torch.compile(model, backend="attn_ops")`` -- the same, with the attention
  substituted by ``attn.prefill`` where "auto" has a backend at least as fast as the original
  (on CPU the sdpa backend, for cache-free prefill);
* ``attn_ops_sdpa`` / ``attn_ops_ref`` (CPU): the substitution forced onto the sdpa / the
  reference backend (``options={"attn_ops.attn_backend": ...}``), to show what each costs
  (``--no-ref`` drops the slow reference).

The model is Llama-shaped (RMSNorm, RoPE, GQA, SwiGLU) with random weights; ``--attention``
selects how it writes attention: ``sdpa`` (``F.scaled_dot_product_attention(is_causal=True,
enable_gqa=True)``) or ``eager`` (Hugging Face's eager form: repeat_kv, ``* scale + mask``,
fp32 softmax). Prints each ``attn_ops* / inductor`` time ratio (< 1: faster than without
substitution) and writes a CSV to benchmarks/results/.

    python benchmarks/bench_substitution.py                      # CPU defaults
    python benchmarks/bench_substitution.py --device cuda        # H100 defaults (bf16)
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F


class Block(torch.nn.Module):
    """One Llama decoder layer: RMSNorm -> GQA attention with RoPE -> RMSNorm -> SwiGLU MLP."""

    def __init__(self, hidden, heads, kv_heads, ffn, attention):
        super().__init__()
        self.h, self.hkv, self.d = heads, kv_heads, hidden // heads
        self.attention = attention
        self.qkv = torch.nn.Linear(hidden, (heads + 2 * kv_heads) * self.d, bias=False)
        self.o = torch.nn.Linear(heads * self.d, hidden, bias=False)
        self.up = torch.nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = torch.nn.Linear(ffn, hidden, bias=False)
        self.n1 = torch.nn.RMSNorm(hidden)
        self.n2 = torch.nn.RMSNorm(hidden)

    def _rope(self, x, pos):
        half = self.d // 2
        freq = 10000.0 ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
        ang = pos[:, None].float() * freq[None, :]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def _attend(self, q, k, v, s):
        if self.attention == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        n = self.h // self.hkv
        b = q.shape[0]
        k = k[:, :, None].expand(b, self.hkv, n, s, self.d).reshape(b, self.h, s, self.d)
        v = v[:, :, None].expand(b, self.hkv, n, s, self.d).reshape(b, self.h, s, self.d)
        pos = torch.arange(s, device=q.device)
        mask = torch.where(pos[None, :] <= pos[:, None], 0.0, torch.finfo(q.dtype).min)
        w = torch.matmul(q, k.transpose(2, 3)) * self.d ** -0.5 + mask.to(q.dtype)
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(w, v)

    def forward(self, x):
        b, s, _ = x.shape
        pos = torch.arange(s, device=x.device)
        q, k, v = self.qkv(self.n1(x)).split([self.h * self.d, self.hkv * self.d,
                                              self.hkv * self.d], dim=-1)
        q = self._rope(q.view(b, s, self.h, self.d), pos[:, None]).transpose(1, 2)
        k = self._rope(k.view(b, s, self.hkv, self.d), pos[:, None]).transpose(1, 2)
        v = v.view(b, s, self.hkv, self.d).transpose(1, 2)
        a = self._attend(q, k, v, s).transpose(1, 2).reshape(b, s, -1)
        x = x + self.o(a)
        gate, up = self.up(self.n2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Model(torch.nn.Module):
    def __init__(self, layers, **kw):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(**kw) for _ in range(layers))

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


def _time_ms(fns: dict, x, device: str, reps: int) -> tuple[dict, dict]:
    """Per contender: median ms per call (warmed up), and its median ratio to ``inductor``.

    On CPU the contenders take turns call by call, in an order that reverses every round, and
    each ratio is the median over rounds of the round's own ``t / t_inductor``: the two calls
    of a round run back to back, so load from other processes on a shared 2-core machine (which
    moved the medians of one contender 3-10x between runs) falls on both alike. On CUDA each is
    timed by triton's do_bench and the ratio is that of the medians.
    """
    for fn in fns.values():
        for _ in range(3):
            fn(x)
    if device == "cuda":
        import triton.testing
        times = {n: triton.testing.do_bench(lambda fn=fn: fn(x), return_mode="median")
                 for n, fn in fns.items()}
        return times, {n: times[n] / times["inductor"] for n in times if n != "inductor"}
    samples = {n: [] for n in fns}
    names = list(fns)
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[n](x)
            samples[n].append((time.perf_counter() - t0) * 1e3)
    ratios = {n: statistics.median(a / b for a, b in zip(samples[n], samples["inductor"]))
              for n in fns if n != "inductor"}
    return {n: statistics.median(t) for n, t in samples.items()}, ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--lengths", type=int, nargs="*")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-ref", action="store_true", help="CPU: leave out attn_ops_ref")
    p.add_argument("--out", default=None, help="CSV path (default benchmarks/results/...)")
    args = p.parse_args()
    cuda = args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:  # ~1B-parameter-class layer shapes (D = 128, GQA 4:1), bf16
        cfg = dict(layers=4, hidden=2048, heads=16, kv_heads=4, ffn=5632)
        dtype, lengths, batch = torch.bfloat16, args.lengths or [512, 1024, 2048, 4096], 4
    else:  # small enough for a 2-core CI box; attention is a large share at S >= 512
        cfg = dict(layers=2, hidden=256, heads=8, kv_heads=2, ffn=512)
        dtype, lengths, batch = torch.float32, args.lengths or [128, 256, 512, 1024], 1
    batch = args.batch or batch
    torch.manual_seed(0)
    model = Model(attention=args.attention, **cfg).to(args.device, dtype).eval()
    contenders = {"inductor": {}, "attn_ops": {"backend": "attn_ops"}}
    if not cuda:
        contenders["attn_ops_sdpa"] = {"backend": "attn_ops",
                                       "options": {"attn_ops.attn_backend": "sdpa"}}
        if not args.no_ref:
            contenders["attn_ops_ref"] = {"backend": "attn_ops",
                                          "options": {"attn_ops.attn_backend": "reference"}}
    # Every (contender, length) pair is its own static-shape graph of one forward: lift
    # Dynamo's per-function limit (8) so that none of them silently falls back to eager.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    rows = []
    with torch.no_grad():
        compiled = {name: torch.compile(model, dynamic=False, **kw)
                    for name, kw in contenders.items()}
        for s in lengths:
            x = torch.randn(batch, s, cfg["hidden"], device=args.device, dtype=dtype)
            ref = model(x)
            for name, fn in compiled.items():
                # Relative to the output's scale: bf16 rounding of a 2-layer model reaches ~0.06
                # absolute on outputs of magnitude ~4 (Inductor's own code, seen on an H100).
                out = fn(x).float()
                err = ((out - ref.float()).abs().max() / ref.float().abs().max()).item()
                if not math.isfinite(err) or err > (3e-2 if dtype != torch.float32 else 1e-4):
                    raise SystemExit(f"{name} at S={s}: max relative error {err} vs eager")
            times, ratios = _time_ms(compiled, x, args.device, args.reps)
            row = dict(device=args.device, attention=args.attention, batch=batch, seq=s,
                       threads=torch.get_num_threads())
            row.update({f"{n}_ms": round(t, 4) for n, t in times.items()})
            row.update({f"{n}_ratio": round(r, 3) for n, r in ratios.items()})
            rows.append(row)
            print(f"{args.device} {args.attention:5s} B={batch} S={s:5d}  " + "  ".join(
                f"{n} {t:9.3f} ms" for n, t in times.items()) + "  " + "  ".join(
                f"{n}/inductor {r:.3f}" for n, r in ratios.items()), flush=True)
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"substitution_{args.device}_{args.attention}"
                                   + (f"_t{args.threads}" if args.threads else "") + ".csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
