"""The demo's human-readable summary: a few aligned tables built from its report dict."""

from __future__ import annotations

from typing import TextIO


def table(rows: list[list], header: list[str], indent: str = "") -> str:
    """Rows of cells as a plain aligned text table (first column left, the others right)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    rule = "  ".join("-" * w for w in widths)
    return "\n".join(indent + x for x in [line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _ok(flag: bool) -> str:
    return "OK" if flag else "FAILED"


def print_summary(report: dict, out: TextIO) -> None:
    """Write the summary of a :func:`attn_ops.demo.job.run` report to ``out``."""
    m = report["model"]
    w = out.write
    w(f"\nattn_ops demo: device={report['device']} dtype={report['dtype']} "
      f"backend={report['backend_choice']}\n")
    w(f"model: Llama-style, {m['layers']} layers, {m['heads']} query heads / {m['kv_heads']} "
      f"kv heads, head dim {m['head_dim']}, vocab {m['vocab']}, {m['params'] / 1e6:.2f}M "
      f"params (random weights)\n\n")
    w(table([[label, name] for label, name in report["backends"].items()],
            ["attention call", "backend"]) + "\n\n")

    c = report.get("compile")
    if c is not None and "error" in c:
        w(f'torch.compile(model, backend="attn_ops") FAILED: {c["error"]}\n\n')
    elif c is not None:
        w('torch.compile(model, backend="attn_ops"):\n')
        if c["cache_hit"]:
            w("  (served by the compile cache: the graph passes did not run this time)\n")
        else:
            rows = [[name, n, c["left_alone"].get(name, 0)]
                    for name, n in c["substitutions"].items()]
            rows += [[name, 0, n] for name, n in c["left_alone"].items()
                     if name not in c["substitutions"]]
            w(table(rows or [["(no attention found)", 0, 0]],
                    ["graph pass", "-> attn.prefill", "left alone"], "  ") + "\n")
        w(f"  compiled code: {c['prefill_calls']} attn.prefill calls for {c['expected']} "
          f"attention layers (backend: {report['backends']['compiled model: attn.prefill']}), "
          f"{c['sdpa_calls']} SDPA calls left\n")
        w(f"  logits vs eager: max abs err {c['max_err']:.2e} (tol {report['logit_tol']:.0e})"
          f"  {_ok(c['ok'])}\n")
        w(f"  compile + first call {c['compile_s']:.1f} s, then {c['call_ms']:.2f} ms/call "
          f"(eager {c['eager_ms']:.2f} ms)\n\n")

    s = report["serving"]
    st = s["stats"]
    w(f"serving: {len(s['requests'])} requests, continuous batching, decode batch padded to "
      f"{s['max_batch']} rows, paged cache {s['num_blocks']} blocks x {s['block_size']} tokens\n")
    w(table([[r["id"], r["prompt_len"], r["new_tokens"], r["admitted_at"], r["finished_at"]]
             for r in s["requests"]],
            ["request", "prompt", "new tokens", "admitted at step", "finished at step"]) + "\n\n")
    pre_ms, dec_ms = 1e3 * st["prefill_s"], 1e3 * st["decode_s"]
    rows = [
        ["prefill", st["prefill_calls"], st["prefill_tokens"], f"{pre_ms:.1f}",
         f"{pre_ms / max(st['prefill_calls'], 1):.2f}",
         f"{st['prefill_tokens'] / max(st['prefill_s'], 1e-9):.0f}"],
        ["decode", st["decode_steps"],
         f"{st['decode_rows']} (+{st['decode_padded_rows']} pad)", f"{dec_ms:.1f}",
         f"{dec_ms / max(st['decode_steps'], 1):.2f}",
         f"{st['decode_rows'] / max(st['decode_s'], 1e-9):.0f}"],
    ]
    w(table(rows, ["phase", "calls", "tokens", "total ms", "ms/call", "tokens/s"]) + "\n")
    w(f"  {st['generated']} tokens generated in {st['wall_s'] * 1e3:.0f} ms wall "
      f"({st['generated'] / max(st['wall_s'], 1e-9):.0f} tokens/s, host scheduling included)\n\n")

    k = report["check"]
    w(f"check vs eager model (teacher-forced greedy): {k['tokens_checked']} tokens, "
      f"{k['mismatches']} mismatches, {k['near_ties']} near ties, max logit err "
      f"{k['max_logit_err']:.2e} (tol {k['logit_tol']:.0e})  {_ok(k['ok'])}\n")
    if "total_s" in report:
        w(f"total {report['total_s']:.1f} s\n")
    w(f"\n{'ALL CHECKS PASSED' if report['ok'] else 'SOME CHECKS FAILED'}\n")
