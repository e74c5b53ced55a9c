"""Continuous batching for the demo: requests admitted and finished at different steps.

The loop is the host half of a serving engine, kept small enough to read in one sitting:

* admission: a waiting request enters when a decode row is free and the paged cache has the
  blocks it will need until it finishes (prompt + new tokens - 1: the last token is never fed
  back), so no running sequence can run out of cache mid-way;
* prefill: all requests admitted in one step go through one packed ``DemoLlama.prefill`` call
  (``cu_seqlens`` of different lengths), which yields each one's first new token;
* decode: every running sequence advances one token per step in one ``DemoLlama.decode`` call
  padded to ``max_batch`` rows (slot -1, ``seqlens_k`` 0 on the padding), the static shape a
  CUDA graph would capture;
* a request that has its ``max_new_tokens`` leaves at once and its blocks go back to the cache.

Greedy sampling (argmax). Timings synchronise the device around the model calls only.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from attn_ops.demo.model import DemoLlama
from attn_ops.paged_cache import PagedKVCache
from attn_ops.demo.timing import timed


@dataclass
class Request:
    """A prompt (token ids) and how many tokens to generate; filled in while served."""
    rid: str
    prompt: list[int]
    max_new_tokens: int
    output: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # float32 [vocab] per new token
    admitted_at: int = -1  # scheduler step of admission / completion
    finished_at: int = -1

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new_tokens

    @property
    def cache_tokens(self) -> int:
        """Tokens this request ever stores: prompt + new - 1 (the last one is never fed back)."""
        return len(self.prompt) + self.max_new_tokens - 1


@dataclass
class ServeStats:
    """Counts and device time of one :func:`serve` run (seconds)."""
    prefill_calls: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_rows: int = 0      # real rows; padded rows are decode_steps * max_batch - decode_rows
    decode_padded_rows: int = 0
    decode_s: float = 0.0
    generated: int = 0
    wall_s: float = 0.0
    max_running: int = 0


def serve(model: DemoLlama, requests: list[Request], cache: PagedKVCache, *, max_batch: int,
          progress=None) -> ServeStats:
    """Serve ``requests`` greedily with continuous batching; fills each request's output.

    Args:
        model: in eval mode, on its device; its ``prefill``/``decode`` run the attn ops.
        requests: admitted in order; each needs ``max_new_tokens >= 1``.
        cache: an empty paged cache from ``model.new_cache`` whose ``max_seq_len`` covers every
            request's ``cache_tokens``; every block is free again when this returns.
        max_batch: decode rows per step (running sequences at most; the rest is padding).
        progress: an object with ``update(n)`` (a ``tqdm`` bar), or None.

    Returns:
        :class:`ServeStats`. Raises ``ValueError`` if a request can never fit in the cache.
    """
    device = model.lm_head.weight.device
    block_size, num_blocks = cache.block_size, cache.num_blocks

    def blocks_for(tokens: int) -> int:
        return -(-tokens // block_size)

    for r in requests:
        if r.max_new_tokens < 1 or not r.prompt:
            raise ValueError(f"request {r.rid}: needs a non-empty prompt and max_new_tokens >= 1")
        if blocks_for(r.cache_tokens) > num_blocks:
            raise ValueError(f"request {r.rid} needs {blocks_for(r.cache_tokens)} blocks of "
                             f"{block_size} tokens; the cache has {num_blocks}")
    stats = ServeStats()
    waiting, running = deque(requests), []
    step = 0
    start = time.perf_counter()

    def emit(batch_reqs: list[Request], logits: torch.Tensor) -> None:
        host = logits.cpu()  # one transfer per step: the scheduler needs the ids on the host
        for r, tok, row in zip(batch_reqs, host.argmax(-1).tolist(), host):
            r.output.append(tok)
            r.logits.append(row)
        stats.generated += len(batch_reqs)
        if progress is not None:
            progress.update(len(batch_reqs))

    def retire() -> None:
        for r in [r for r in running if r.done]:
            running.remove(r)
            r.finished_at = step
            if r.rid in cache:
                cache.free(r.rid)

    while waiting or running:
        # Admit while a row is free and the cache can hold the newcomer to its end.
        outstanding = sum(blocks_for(r.cache_tokens) - len(cache.blocks(r.rid)) for r in running)
        admitted = []
        while waiting and len(running) + len(admitted) < max_batch:
            need = blocks_for(waiting[0].cache_tokens)
            if cache.num_free_blocks - outstanding < need:
                break
            outstanding += need
            admitted.append(waiting.popleft())
        if admitted:
            batch = cache.prepare_prefill({r.rid: len(r.prompt) for r in admitted})
            ids = torch.tensor([t for r in admitted for t in r.prompt], device=device)
            logits, dt = timed(lambda: model.prefill(ids, cache, batch), device)
            stats.prefill_calls += 1
            stats.prefill_tokens += ids.numel()
            stats.prefill_s += dt
            for r in admitted:
                r.admitted_at = step
            running += admitted
            emit(admitted, logits)
            retire()
        elif not running:
            raise RuntimeError("scheduler stalled: nothing running and nothing admissible")
        if running:
            batch = cache.prepare_decode([r.rid for r in running], pad_to=max_batch)
            pad = max_batch - len(running)
            ids = torch.tensor([r.output[-1] for r in running] + [0] * pad, device=device)
            logits, dt = timed(lambda: model.decode(ids, cache, batch), device)
            stats.decode_steps += 1
            stats.decode_rows += len(running)
            stats.decode_padded_rows += pad
            stats.decode_s += dt
            stats.max_running = max(stats.max_running, len(running))
            emit(list(running), logits[:len(running)])
            retire()
        step += 1
    stats.wall_s = time.perf_counter() - start
    return stats


@dataclass
class TokenCheck:
    """Served tokens and logits against the eager full-recompute model, teacher-forced."""
    tokens_checked: int
    mismatches: int          # served token != eager argmax where eager had a clear winner
    near_ties: int           # differing where eager's top-2 gap was below ``2 * logit_tol``
    max_logit_err: float     # served vs eager logits, over every checked position
    logit_tol: float

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and self.max_logit_err <= self.logit_tol


@torch.no_grad()
def check_against_eager(model: DemoLlama, requests: list[Request],
                        logit_tol: float) -> TokenCheck:
    """Recompute each finished request with ``model.forward`` on prompt + served tokens.

    Teacher forcing checks every position independently: served token i must be the eager
    argmax after prompt + served[:i]. When all are, eager greedy generation produces exactly
    the served sequence. A difference counts as a near tie (not a failure) only when eager's
    top-2 logits are within ``2 * logit_tol`` (low precision rounding can flip those); the
    served logits must be within ``logit_tol`` of eager's everywhere.
    """
    device = model.lm_head.weight.device
    checked = mismatches = ties = 0
    max_err = 0.0
    for r in requests:
        ids = torch.tensor([r.prompt + r.output[:-1]], device=device)
        eager = model(ids)[0, len(r.prompt) - 1:].float().cpu()  # [new, vocab]
        served = torch.stack(r.logits)
        max_err = max(max_err, (eager - served).abs().max().item())
        top2 = eager.topk(2, dim=-1).values
        gap = top2[:, 0] - top2[:, 1]
        differs = eager.argmax(-1) != torch.tensor(r.output)
        tie = differs & (gap < 2 * logit_tol)
        checked += len(r.output)
        ties += int(tie.sum())
        mismatches += int((differs & ~tie).sum())
    return TokenCheck(checked, mismatches, ties, max_err, logit_tol)
