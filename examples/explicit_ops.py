"""A serving loop written directly against ``torch.ops.attn.*`` and ``attn_ops.PagedKVCache``.

One attention layer (random per-token q/k/v standing in for a model's projections) serves four
sequences through everything a paged engine does, and checks every output against
``F.scaled_dot_product_attention`` over the dense history it keeps on the side:

1. packed prefill of two prompts of different lengths (``cu_seqlens``, one call);
2. decode steps, the batch padded to a fixed number of rows (slot -1, ``seqlens_k`` 0);
3. a third sequence joins mid-way with a chunked prefill: its second chunk attends to the first
   through the block table (prefix caching, bottom-right causal mask);
4. a fourth sequence forks the first (``PagedKVCache.fork`` shares its full blocks) and decodes
   on its own from there;
5. finished sequences free their blocks, which later allocations reuse.

Run: ``python examples/explicit_ops.py [--device cpu|cuda] [--backend auto|reference|...]``.
Exits 1 if any output differs from SDPA beyond the dtype's tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

import attn_ops
from attn_ops import PagedKVCache

H, HKV, D = 8, 2, 64          # GQA: 4 query heads per kv head
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def sdpa_reference(q, k, v, scale):
    """One sequence: q ``[lq, H, D]`` over k/v ``[lk, Hkv, D]``, bottom-right causal, in fp32."""
    lq, lk = q.shape[0], k.shape[0]
    k = k.repeat_interleave(H // HKV, dim=1)
    v = v.repeat_interleave(H // HKV, dim=1)
    i = torch.arange(lq, device=q.device)[:, None]
    j = torch.arange(lk, device=q.device)[None, :]
    mask = j <= i + lk - lq
    out = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k.transpose(0, 1).float(),
                                         v.transpose(0, 1).float(), attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


class Server:
    """The loop's state: the cache, each sequence's dense K/V history, the worst error seen."""

    def __init__(self, device, dtype, block_size=16, num_blocks=12, max_seq_len=96, rows=4):
        self.cache = PagedKVCache(num_blocks, block_size, HKV, D, max_seq_len=max_seq_len,
                                  dtype=dtype, device=device)
        self.device, self.dtype, self.rows = device, dtype, rows
        self.scale = D ** -0.5
        self.history: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.max_err = 0.0
        self.calls = {"store_kvcache": 0, "prefill": 0, "decode": 0}

    def _rand(self, *shape):
        return torch.randn(*shape, device=self.device, dtype=self.dtype)

    def _append(self, seq, k, v):
        old_k, old_v = self.history.get(seq, (k[:0], v[:0]))
        self.history[seq] = (torch.cat([old_k, k]), torch.cat([old_v, v]))

    def _check(self, out, expected):
        assert not torch.isnan(out).any(), "NaN in an attention output"
        self.max_err = max(self.max_err, (out.float() - expected).abs().max().item())

    def prefill(self, new_tokens: dict[str, int]):
        """New tokens of several sequences in one packed call (continuing cached ones)."""
        batch = self.cache.prepare_prefill(new_tokens)
        t = sum(new_tokens.values())
        q, k, v = self._rand(t, H, D), self._rand(t, HKV, D), self._rand(t, HKV, D)
        torch.ops.attn.store_kvcache(k, v, self.cache.k_cache(), self.cache.v_cache(),
                                     batch.slot_mapping)
        out = torch.ops.attn.prefill(q, self.cache.k_cache(), self.cache.v_cache(),
                                     batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q,
                                     batch.max_seqlen_k, self.scale, True, batch.block_table)
        self.calls["store_kvcache"] += 1
        self.calls["prefill"] += 1
        start = 0
        for seq, n in new_tokens.items():
            rows = slice(start, start + n)
            self._append(seq, k[rows], v[rows])
            self._check(out[rows], sdpa_reference(q[rows], *self.history[seq], self.scale))
            start += n

    def decode(self, seqs: list[str]):
        """One token for each of ``seqs``, the batch padded to ``self.rows`` rows."""
        batch = self.cache.prepare_decode(seqs, pad_to=self.rows)
        q = self._rand(self.rows, H, D)
        k, v = self._rand(self.rows, HKV, D), self._rand(self.rows, HKV, D)
        torch.ops.attn.store_kvcache(k, v, self.cache.k_cache(), self.cache.v_cache(),
                                     batch.slot_mapping)
        out = torch.ops.attn.decode(q, self.cache.k_cache(), self.cache.v_cache(),
                                    batch.seqlens_k, batch.block_table, self.scale)
        self.calls["store_kvcache"] += 1
        self.calls["decode"] += 1
        for row, seq in enumerate(seqs):
            self._append(seq, k[row:row + 1], v[row:row + 1])
            self._check(out[row:row + 1],
                        sdpa_reference(q[row:row + 1], *self.history[seq], self.scale))
        padded = out[len(seqs):]
        assert torch.equal(padded, torch.zeros_like(padded)), "padded decode rows must be zero"

    def fork(self, parent: str, child: str):
        self.cache.fork(parent, child)
        self.history[child] = self.history[parent]

    def finish(self, seq: str):
        self.cache.free(seq)
        del self.history[seq]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--json", metavar="PATH", help="write the checked values as JSON to PATH")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    srv = Server(device, dtype)
    free_at_start = srv.cache.num_free_blocks
    with attn_ops.use_backend(args.backend), torch.inference_mode():
        srv.prefill({"a": 13, "b": 37})               # 1. packed prefill, odd lengths
        for _ in range(3):
            srv.decode(["a", "b"])                      # 2. padded decode: 2 real rows of 4
        srv.prefill({"c": 7})                           # 3. c joins: first chunk...
        srv.decode(["a", "b"])
        srv.prefill({"c": 20, "a": 1})                  # ...second chunk sees the first
        srv.fork("a", "d")                              # 4. d shares a's prefix
        for _ in range(5):
            srv.decode(["a", "b", "c", "d"])            # a full batch: no padding
        srv.finish("b")                                 # 5. b's blocks go back
        srv.prefill({"e": 30})                          # ...and are reused by e
        for _ in range(2):
            srv.decode(["e", "d"])
        lengths = {s: int(srv.history[s][0].shape[0]) for s in srv.history}
        for seq in list(srv.history):
            srv.finish(seq)
    report = {"device": str(device), "dtype": str(dtype), "backend": args.backend,
              "max_err": srv.max_err, "tol": TOL[dtype], "calls": srv.calls,
              "final_lengths": lengths,
              "blocks_leaked": free_at_start - srv.cache.num_free_blocks}
    ok = srv.max_err <= TOL[dtype] and report["blocks_leaked"] == 0
    report["ok"] = ok
    print(f"explicit ops: {sum(srv.calls.values())} op calls {srv.calls}, sequences "
          f"{lengths}, max |attn - sdpa| {srv.max_err:.2e} (tol {TOL[dtype]:.0e}): "
          f"{'OK' if ok else 'FAILED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
