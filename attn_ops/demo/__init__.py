"""The project in one command: ``python -m attn_ops.demo [--device cpu] [--backend auto]``.

1. Builds :class:`~attn_ops.demo.model.DemoLlama` (random weights, fixed seed, no download).
2. Compiles it with ``torch.compile(model, backend="attn_ops")``, reports how many attention
   calls were substituted by ``torch.ops.attn.prefill`` and which backend runs them, and checks
   the compiled logits against eager (:mod:`attn_ops.demo.compile_check`).
3. Serves prompts of different lengths with a paged KV cache and continuous batching
   (:mod:`attn_ops.demo.serving`): packed prefill, then decode steps through
   ``store_kvcache`` + ``decode``, sequences joining and finishing at different steps, each
   decode batch padded to a fixed size.
4. Checks the served tokens and logits against the eager model and prints a summary table
   (:mod:`attn_ops.demo.report`).

Modules: ``__main__`` (the command line), ``job`` (steps 1-4, returning a report dict),
``model``, ``serving``, ``compile_check``, ``report``, ``timing``. ``import attn_ops`` does not
import this package; this file imports nothing, so ``attn_ops.demo.compile_check`` can be used
on its own (``examples/compile_model.py`` does).

Exit status: 0 when every check passes, 1 when one fails, 2 when the device or the backend is
not available here (with a message saying why and what to do).
"""
