"""A gpt-fast-style decode step over a static KV cache: substituted vs not vs written on the ops.

The model is gpt-fast's shape of Llama (RMSNorm, RoPE, GQA, SwiGLU; no embedding or LM head,
the step starts from hidden states): every layer keeps ``k_cache``/``v_cache`` buffers
``[B, Hkv, S_max, D]``, writes the new token with ``cache[:, :, input_pos] = k`` and attends
with ``causal_mask[None, None, input_pos]`` sliced from a bool ``[S_max, S_max]`` buffer. Two
ways of writing the GQA attention (``--forms``):

* ``repeat_interleave``: ``k.repeat_interleave(H // Hkv, dim=1)`` then SDPA with the mask (as
  gpt-fast writes it);
* ``enable_gqa``: ``F.scaled_dot_product_attention(..., attn_mask=mask, enable_gqa=True)``.

Contenders, one CUDA graph each, captured once and replayed at every position (the position
is a device tensor, so the same graph serves them all), timed in the same process:

* ``inductor``: ``torch.compile(model, fullgraph=True)``: the attention as written;
* ``attn_ops``: ``torch.compile(model, backend="attn_ops", fullgraph=True)``: the passes
  replace the cache write + masked SDPA by ``attn.decode`` over the cache, reading ``pos + 1``
  keys instead of ``S_max``;
* ``ops_by_hand``: the same step written on ``attn.store_kvcache`` + ``attn.decode`` over a
  token-major paged cache (the upper bound the substitution aims at), compiled by Inductor.

Before timing, the substituted step's output is compared with the unsubstituted one and the
``attn::decode`` calls of one step are counted (one per layer expected). Prints per-step times,
ratios and tokens/s; writes ``benchmarks/results/cache_substitution.csv``.

    python benchmarks/bench_cache_substitution.py                  # H200 defaults (bf16)
    python benchmarks/bench_cache_substitution.py --device cpu --size cpu --positions 128 1024 1900
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics

import torch
import torch.nn.functional as F


class Layer(torch.nn.Module):
    """One decoder layer with its static cache; ``form`` picks how attention is written."""

    def __init__(self, hidden, heads, kv_heads, ffn, batch, s_max, form, dtype, device):
        super().__init__()
        self.h, self.hkv, self.d, self.form = heads, kv_heads, hidden // heads, form
        kw = dict(dtype=dtype, device=device)
        self.wqkv = torch.nn.Linear(hidden, (heads + 2 * kv_heads) * self.d, bias=False, **kw)
        self.wo = torch.nn.Linear(heads * self.d, hidden, bias=False, **kw)
        self.w13 = torch.nn.Linear(hidden, 2 * ffn, bias=False, **kw)
        self.w2 = torch.nn.Linear(ffn, hidden, bias=False, **kw)
        self.n1 = torch.nn.RMSNorm(hidden, **kw)
        self.n2 = torch.nn.RMSNorm(hidden, **kw)
        shape = (batch, kv_heads, s_max, self.d)
        self.register_buffer("k_cache", torch.randn(shape, **kw) * 0.5)
        self.register_buffer("v_cache", torch.randn(shape, **kw))

    def rope(self, x, pos):
        half = self.d // 2
        freq = 10000.0 ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
        ang = pos[:, None].float() * freq[None, :]  # [S, D/2]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def forward(self, x, input_pos, mask):
        b, s, _ = x.shape
        q, k, v = self.wqkv(self.n1(x)).split([self.h * self.d, self.hkv * self.d,
                                               self.hkv * self.d], dim=-1)
        q = self.rope(q.view(b, s, self.h, self.d), input_pos).transpose(1, 2)
        k = self.rope(k.view(b, s, self.hkv, self.d), input_pos).transpose(1, 2)
        v = v.view(b, s, self.hkv, self.d).transpose(1, 2)
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        kc, vc = self.k_cache, self.v_cache
        if self.form == "repeat_interleave":
            g = self.h // self.hkv
            o = F.scaled_dot_product_attention(q, kc.repeat_interleave(g, dim=1),
                                               vc.repeat_interleave(g, dim=1), attn_mask=mask)
        else:
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)
        x = x + self.wo(o.transpose(1, 2).reshape(b, s, self.h * self.d))
        gate, up = self.w13(self.n2(x)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


class Model(torch.nn.Module):
    """``num_layers`` layers and gpt-fast's bool ``causal_mask`` buffer."""

    def __init__(self, layers, hidden, heads, kv_heads, ffn, batch, s_max, form, dtype, device):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            Layer(hidden, heads, kv_heads, ffn, batch, s_max, form, dtype, device)
            for _ in range(layers))
        self.register_buffer("causal_mask", torch.tril(
            torch.ones(s_max, s_max, dtype=torch.bool, device=device)))

    def forward(self, x, input_pos):
        mask = self.causal_mask[None, None, input_pos]
        for layer in self.layers:
            x = layer(x, input_pos, mask)
        return x


class OpsModel(torch.nn.Module):
    """The same step on ``attn.store_kvcache`` + ``attn.decode`` (token-major paged cache with
    one block of ``S_max`` tokens per sequence), sharing ``model``'s weights and cache contents."""

    def __init__(self, model: Model):
        super().__init__()
        self.model = model
        for i, layer in enumerate(model.layers):  # token-major copies of the caches
            self.register_buffer(f"k{i}", layer.k_cache.transpose(1, 2).contiguous())
            self.register_buffer(f"v{i}", layer.v_cache.transpose(1, 2).contiguous())
        b = model.layers[0].k_cache.shape[0]
        dev = model.causal_mask.device
        self.register_buffer("table", torch.arange(b, dtype=torch.int32, device=dev)[:, None])

    def forward(self, x, input_pos):
        b, s_max = x.shape[0], self.model.causal_mask.shape[0]
        slots = (self.table[:, 0].long() * s_max + input_pos).to(torch.int64)
        seqlens = (input_pos + 1).to(torch.int32).expand(b)
        for i, layer in enumerate(self.model.layers):
            kc, vc = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            q, k, v = layer.wqkv(layer.n1(x)).split(
                [layer.h * layer.d, layer.hkv * layer.d, layer.hkv * layer.d], dim=-1)
            q = layer.rope(q.view(b, 1, layer.h, layer.d), input_pos)
            k = layer.rope(k.view(b, 1, layer.hkv, layer.d), input_pos)
            torch.ops.attn.store_kvcache(k.view(b, layer.hkv, layer.d),
                                         v.view(b, layer.hkv, layer.d), kc, vc, slots)
            o = torch.ops.attn.decode(q.view(b, layer.h, layer.d), kc, vc, seqlens, self.table,
                                      layer.d ** -0.5)
            x = x + layer.wo(o.view(b, 1, layer.h * layer.d))
            gate, up = layer.w13(layer.n2(x)).chunk(2, dim=-1)
            x = x + layer.w2(F.silu(gate) * up)
        return x


def graph_timer(fn, x, pos, device, warmup=3):
    """Capture ``fn(x, pos)`` once in a CUDA graph; return ``time(position) -> ms`` (median of 5
    x 20 replays) and the graph's output tensor. On the CPU: plain calls."""
    for _ in range(warmup):
        out = fn(x, pos)
    if device != "cuda":
        def run(p, reps=15):
            pos.fill_(p)
            import time
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn(x, pos)
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        return run, lambda: fn(x, pos)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x, pos)

    def run(p, reps=20):
        pos.fill_(p)
        graph.replay()
        torch.cuda.synchronize()
        samples = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / reps)
        return statistics.median(samples)

    def output():
        graph.replay()
        return out
    return run, output


def count_decode_calls(fn, x, pos) -> int:
    """``attn::decode`` calls of one step, or, where Inductor launches our decode kernel from its
    own code (the op inlined), launches of that kernel."""
    with torch.profiler.profile() as prof:
        fn(x, pos)
    events = prof.key_averages()
    calls = sum(e.count for e in events if e.key == "attn::decode")
    return calls or sum(e.count for e in events if "_decode_split_kernel" in e.key
                        and e.device_type == torch.autograd.DeviceType.CUDA)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", choices=("h200", "cpu", "tiny"), default="h200",
                   help="h200: the issue's shape; cpu: a 2-layer model a CPU runs in seconds; "
                        "tiny: a smoke run")
    p.add_argument("--backend", default=None,
                   help="the attn backend the substitution uses (default: auto)")
    p.add_argument("--forms", nargs="+", default=["repeat_interleave", "enable_gqa"])
    p.add_argument("--positions", nargs="+", type=int, default=[512, 2048, 6144])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--csv", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "cache_substitution.csv"))
    args = p.parse_args()
    import attn_ops  # noqa: F401  (registers torch.ops.attn.*)

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    sizes = {  # h200: the shape, 4 layers of Llama-3-8B width, B 32, S_max 8192
        "h200": dict(layers=4, hidden=4096, heads=32, kv_heads=8, ffn=14336, batch=32,
                     s_max=8192),
        "cpu": dict(layers=2, hidden=512, heads=8, kv_heads=2, ffn=1024, batch=4, s_max=2048),
        "tiny": dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, batch=2, s_max=32),
    }[args.size]
    rows = []
    hand_times = {}
    for form in args.forms:
        model = Model(**sizes, form=form, dtype=dtype, device=dev).eval()
        x = torch.randn(sizes["batch"], 1, sizes["hidden"], dtype=dtype, device=dev)
        pos = torch.tensor([args.positions[0]], device=dev)
        contenders = {
            "inductor": torch.compile(model, fullgraph=True),
            "attn_ops": torch.compile(model, backend="attn_ops", fullgraph=True,
                                      options=None if args.backend is None else
                                      {"attn_ops.attn_backend": args.backend}),
        }
        if not hand_times:
            contenders["ops_by_hand"] = torch.compile(OpsModel(model), fullgraph=True)
        with torch.no_grad():
            timers = {name: graph_timer(fn, x, pos, dev) for name, fn in contenders.items()}
            calls = count_decode_calls(contenders["attn_ops"], x, pos)  # warm: no tracing
            for position in args.positions:
                pos.fill_(position)
                want = timers["inductor"][1]().float().clone()
                got = timers["attn_ops"][1]().float()
                err = (got - want).abs().max().item()
                times = {name: run(position) for name, (run, _) in timers.items()}
                if "ops_by_hand" in times:
                    hand_times[position] = times["ops_by_hand"]
                hand = hand_times[position]
                row = dict(form=form, position=position, inductor_ms=times["inductor"],
                           attn_ops_ms=times["attn_ops"], ops_by_hand_ms=hand,
                           speedup_vs_inductor=times["inductor"] / times["attn_ops"],
                           vs_by_hand=times["attn_ops"] / hand,
                           tokens_per_s=sizes["batch"] / times["attn_ops"] * 1e3,
                           decode_calls_per_step=calls, max_abs_diff=err)
                rows.append(row)
                print(f"{form:18s} pos {position:5d}: inductor {times['inductor']:.3f} ms, "
                      f"attn_ops {times['attn_ops']:.3f} ms "
                      f"({row['speedup_vs_inductor']:.2f}x), by hand {hand:.3f} ms "
                      f"(attn_ops/by hand {row['vs_by_hand']:.3f}), "
                      f"{row['tokens_per_s']:.0f} tok/s, {calls} attn::decode per step, "
                      f"max |diff| {err:.3g}", flush=True)
        del model, contenders, timers
        if dev == "cuda":
            torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("wrote", args.csv)


if __name__ == "__main__":
    main()
