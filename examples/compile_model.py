"""Automatic substitution: ``torch.compile(model, backend="attn_ops")`` on models left as written.

Two models, neither of which mentions attn_ops:

1. a plain PyTorch decoder block whose attention is hand-written the way many models write it
   (``softmax(q @ k^T / sqrt(d) + causal_mask) @ v`` with a ``repeat_kv`` GQA expansion and an
   additive ``-inf`` upper-triangular mask): Inductor's joint-graph pass replaces it;
2. a transformers ``LlamaForCausalLM`` (random weights, built from a config: no download) with
   its default SDPA attention: the pre-grad pass replaces each ``F.scaled_dot_product_attention``.
   Skipped, with a message, when transformers is not installed.

For each, the example checks that the generated code calls ``attn.prefill`` once per attention
layer and no SDPA is left, and compares the compiled logits with eager.

On a CPU the compile names the ``sdpa`` backend (``options={"attn_ops.attn_backend": "sdpa"}``):
under "auto" the passes substitute only where the op is measured faster than the attention it
replaces (Triton / flash on CUDA; on a CPU the sdpa backend from B*H*Sq*Sk*D >= 2^26 only, and
this example's model is smaller).

Run: ``python examples/compile_model.py [--device cpu|cuda]``. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
from torch import nn

from attn_ops.demo.compile_check import compile_and_check

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


class HandWrittenBlock(nn.Module):
    """Pre-norm decoder block, attention written out by hand. x ``[B, S, hidden]`` -> same."""

    def __init__(self, hidden=64, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * self.head_dim)
        self.out = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(),
                                 nn.Linear(4 * hidden, hidden))

    def attention(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([self.heads * self.head_dim,
                                     self.kv_heads * self.head_dim,
                                     self.kv_heads * self.head_dim], dim=-1)
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        rep = self.heads // self.kv_heads            # repeat_kv: [B, Hkv, S, D] -> [B, H, S, D]
        k = k[:, :, None].expand(b, self.kv_heads, rep, s, self.head_dim).reshape(b, -1, s,
                                                                                 self.head_dim)
        v = v[:, :, None].expand(b, self.kv_heads, rep, s, self.head_dim).reshape(b, -1, s,
                                                                                 self.head_dim)
        mask = torch.full((s, s), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim) + mask
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return self.out((probs @ v).transpose(1, 2).reshape(b, s, -1))

    def forward(self, x):
        x = x + self.attention(self.norm(x))
        return x + self.mlp(x)


class PlainModel(nn.Module):
    """Embedding, two hand-written blocks, LM head: int64 ``[B, S]`` -> logits ``[B, S, V]``."""

    def __init__(self, vocab=101, hidden=64, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(HandWrittenBlock(hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def compile_and_compare(name: str, model: nn.Module, ids: torch.Tensor, layers: int,
                        output=lambda out: out) -> dict:
    """``torch.compile(model, backend="attn_ops")``, then check what was substituted.

    :func:`attn_ops.demo.compile_check.compile_and_check` counts the ``attn.prefill`` and SDPA calls
    in the code Inductor generated (the graph passes' counters stay empty when the compile
    cache serves the graph) and compares the compiled output with eager.
    """
    dtype = next(model.parameters()).dtype
    # On a CPU "auto" substitutes only attention large enough to outweigh the op's fixed host
    # cost (the sdpa backend's dense path, B*H*Sq*Sk*D >= 2^26); naming it substitutes anyway.
    options = {"attn_ops.attn_backend": "sdpa"} if ids.device.type == "cpu" else None
    with torch.inference_mode():
        r = compile_and_check(model, (ids,), expected=layers, tol=TOL[dtype], output=output,
                              options=options)
    print(f"{name}: {r['prefill_calls']}/{layers} attention layers call attn.prefill "
          f"(passes: {r['substitutions'] or 'cached'}), max |compiled - eager| "
          f"{r['max_err']:.2e}: {'OK' if r['ok'] else 'FAILED'}")
    return r


def transformers_llama(device, dtype):
    """A 2-layer LlamaForCausalLM from a config (no download), or None without transformers."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("transformers is not installed: skipping the transformers model "
              "(pip install 'attn_ops[hf]')")
        return None
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", metavar="PATH", help="write the checked values as JSON to PATH")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    ids = torch.randint(0, 101, (2, 19), device=device)
    models = {"plain model (hand-written attention)": compile_and_compare(
        "plain model (hand-written attention)",
        PlainModel().to(device=device, dtype=dtype).eval(), ids, layers=2)}
    llama = transformers_llama(device, dtype)
    if llama is not None:
        models["transformers LlamaForCausalLM (sdpa)"] = compile_and_compare(
            "transformers LlamaForCausalLM (sdpa)", llama, ids, layers=2,
            output=lambda out: out.logits)
    ok = all(m["ok"] for m in models.values())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ok": ok, "device": str(device), "models": models}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
