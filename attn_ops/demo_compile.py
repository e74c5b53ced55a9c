"""The demo's compile step: ``torch.compile(model, backend="attn_ops")`` checked against eager."""

from __future__ import annotations

import time

import torch


def substitution_counts() -> dict[str, int]:
    """Nonzero substitution counters of the attn_ops compile backend, by name."""
    from torch._dynamo.utils import counters
    return {name: n for name, n in counters["attn_ops"].items() if n}


def compile_and_check(model: torch.nn.Module, input_ids: torch.Tensor, tol: float) -> dict:
    """Compile ``model`` with the attn_ops backend, run it on ``input_ids [B, S]``, compare.

    Returns a dict: ``substitutions`` (counter name -> count), ``expected`` (attention layers
    of the model), ``max_err`` (compiled vs eager logits), ``ok``, ``compile_s`` (compile +
    first call) and ``call_ms`` (a later call).
    """
    from torch._dynamo.utils import counters
    counters.clear()
    torch._dynamo.reset()
    eager = model(input_ids)
    compiled = torch.compile(model, backend="attn_ops")
    start = time.perf_counter()
    out = compiled(input_ids)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled(input_ids)
    call_ms = 1e3 * (time.perf_counter() - start)
    subs = substitution_counts()
    expected = len(model.layers)
    max_err = (out.float() - eager.float()).abs().max().item()
    return {"substitutions": subs, "attn_prefill_in_graph": sum(subs.values()),
            "expected": expected, "max_err": max_err,
            "ok": bool(max_err <= tol and sum(subs.values()) == expected),
            "compile_s": compile_s, "call_ms": call_ms}
