"""``torch.compile(model, backend="attn_ops")`` checked: what was substituted, same outputs.

Two views of what was substituted:

* the graph passes' counters (``torch._dynamo.utils.counters["graph_passes"]``: ``<pass>`` per
  replaced call, ``<pass>_left_alone`` per refused one). They count only when the passes run:
  a warm AOTAutograd / FX graph cache serves the compiled graph without running them.
* the code Inductor generated, which the caches return too: the number of
  ``torch.ops.attn.prefill`` calls in it, and of SDPA calls left in it. This is what the check
  relies on.
"""

from __future__ import annotations

import re

import torch

from attn_ops.demo.timing import timed

_PREFILL_CALL = re.compile(r"torch\.ops\.attn\.prefill\.default\(")
_SDPA_CALL = re.compile(r"aten\._?scaled_dot_product\w*\.default\(|scaled_dot_product_attention\(")


def pass_counters() -> tuple[dict[str, int], dict[str, int]]:
    """(calls replaced by each graph pass, calls each pass left alone) since the last clear."""
    from torch._dynamo.utils import counters
    done, left = {}, {}
    for name, n in counters["graph_passes"].items():
        if n and name.endswith("_left_alone"):
            left[name[:-len("_left_alone")]] = n
        elif n:
            done[name] = n
    return done, left


def compile_and_check(model: torch.nn.Module, inputs: tuple, *, expected: int, tol: float,
                      options: dict | None = None, output=lambda out: out) -> dict:
    """Compile ``model`` with the attn_ops backend, run it on ``inputs``, compare with eager.

    Args:
        model: in eval mode; called as ``model(*inputs)``.
        inputs: a tuple of example inputs (e.g. ``(input_ids [B, S],)``).
        expected: attention calls the model makes (all should become ``attn.prefill``).
        tol: max abs difference allowed between compiled and eager outputs.
        options: go to ``torch.compile(..., options=options)`` (``attn_ops.*`` keys configure
            the substitution, see ``graph_passes.SubstitutionOptions``).
        output: picks the tensor to compare from the model's output (e.g. ``.logits``).

    Returns a dict: ``prefill_calls`` / ``sdpa_calls`` (in the generated code), ``expected``,
    ``substitutions`` / ``left_alone`` (pass counters; empty on a cache hit), ``cache_hit``,
    ``max_err``, ``tol``, ``ok`` (``expected`` attn.prefill calls, no SDPA, outputs within
    ``tol``), ``compile_s`` (compile + first call), ``call_ms`` (a later call) and
    ``eager_ms`` (an eager call).
    """
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code
    device = inputs[0].device
    eager = output(model(*inputs))
    eager_s = timed(lambda: model(*inputs), device)[1]
    counters.clear()
    compiled = torch.compile(model, backend="attn_ops", options=options)
    # run_and_get_code resets Dynamo first (a fresh compile) and collects the generated code.
    (out, codes), compile_s = timed(lambda: run_and_get_code(compiled, *inputs), device)
    call_s = timed(lambda: compiled(*inputs), device)[1]
    done, left = pass_counters()
    prefill_calls = sum(len(_PREFILL_CALL.findall(code)) for code in codes)
    sdpa_calls = sum(len(_SDPA_CALL.findall(code)) for code in codes)
    max_err = (output(out).float() - eager.float()).abs().max().item()
    return {"prefill_calls": prefill_calls, "sdpa_calls": sdpa_calls, "expected": expected,
            "substitutions": done, "left_alone": left,
            "cache_hit": bool(counters["aot_autograd"]["autograd_cache_hit"]
                              or counters["inductor"]["fxgraph_cache_hit"]),
            "max_err": max_err, "tol": tol,
            "ok": bool(max_err <= tol and prefill_calls == expected and sdpa_calls == 0),
            "compile_s": compile_s, "call_ms": 1e3 * call_s, "eager_ms": 1e3 * eager_s}
