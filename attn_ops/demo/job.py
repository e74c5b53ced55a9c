"""The demo's job: build the model, compile and check it, serve requests, check the tokens.

:func:`run` does steps 1-4 of :mod:`attn_ops.demo` and returns the report as a JSON-able dict;
:mod:`attn_ops.demo.__main__` prints it. Raises :class:`DemoError` (exit status 2) when the
device or the backend asked for cannot run here.
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from attn_ops import decode_config, prefill_config, registry, store_config
from attn_ops.demo.compile_check import compile_and_check
from attn_ops.demo.model import DemoConfig, DemoLlama
from attn_ops.demo.serving import Request, check_against_eager, serve

# Logit tolerance per dtype (absolute; logits are O(1)): fp32 differences come from summation
# order only (~2e-6 measured on CPU), half precisions from rounding every layer's activations.
LOGIT_TOL = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 1e-1}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROMPT_LENS = (5, 17, 9, 30, 3, 12)              # odd lengths, one per request
NEW_TOKEN_FRACTIONS = (1.0, 0.25, 0.5, 0.75, 0.4, 1.0)  # of --steps: finish at different steps


class DemoError(Exception):
    """The requested device or backend cannot run here; the message says why."""


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda[:i]`` or ``npu[:i]`` as a device, or :class:`DemoError` if unavailable."""
    kind = name.split(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DemoError(f"device {name!r} is not available: torch {torch.__version__} sees no "
                            f"CUDA GPU (torch.version.cuda={torch.version.cuda}). Run with "
                            f"--device cpu, or install a CUDA build of torch on a GPU machine.")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise DemoError(f"device {name!r} is not available: this machine has "
                            f"{torch.cuda.device_count()} CUDA GPU(s)")
    elif kind == "npu":
        try:
            import torch_npu  # noqa: F401  (registers the npu device)
        except ImportError:
            raise DemoError(f"device {name!r} needs torch_npu, which is not installed "
                            f"(pip install 'attn_ops[npu]' on an Ascend machine).") from None
        if not torch.npu.is_available():
            raise DemoError(f"device {name!r}: torch_npu sees no Ascend NPU.")
    elif kind != "cpu":
        raise DemoError(f"unknown device {name!r}; expected cpu, cuda or npu")
    return torch.device(name)


def planned_backends(cfg: DemoConfig, device: torch.device, dtype: torch.dtype,
                     block_size: int) -> dict[str, str]:
    """Which backend serves each attention call of the demo, under the current choice.

    The registry decides per call from (device, dtype, shapes, options) deterministically, so
    asking with tensors of the demo's shapes tells what the real calls will use. Raises
    :class:`DemoError` when an explicitly chosen backend cannot serve one of them.
    """
    h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = torch.empty(1, h, d, device=device, dtype=dtype)
    k = torch.empty(1, hkv, d, device=device, dtype=dtype)
    cache = torch.empty(1, block_size, hkv, d, device=device, dtype=dtype)
    table = torch.empty(1, 1, device=device, dtype=torch.int32)
    slots = torch.empty(1, device=device, dtype=torch.int64)
    calls = {
        "compiled model: attn.prefill": prefill_config(q, k, True, None, -1, 0.0),
        "serving: attn.store_kvcache": store_config(k, cache, slots),
        "serving: attn.prefill (paged)": prefill_config(q, cache, True, table, -1, 0.0),
        "serving: attn.decode": decode_config(q, cache, -1, 0.0),
    }
    out = {}
    for label, config in calls.items():
        try:
            out[label] = registry.select(config).name
        except (registry.BackendUnavailable, ImportError) as e:
            raise DemoError(str(e)) from None
    return out


def make_requests(vocab_size: int, steps: int, seed: int) -> list[Request]:
    """Six prompts of random tokens, lengths :data:`PROMPT_LENS`, up to ``steps`` new tokens."""
    gen = torch.Generator().manual_seed(seed + 1)
    return [Request(rid=f"r{i}", prompt=torch.randint(0, vocab_size, (n,), generator=gen).tolist(),
                    max_new_tokens=max(1, round(steps * frac)))
            for i, (n, frac) in enumerate(zip(PROMPT_LENS, NEW_TOKEN_FRACTIONS))]


def run(device: str = "cpu", backend: str = "auto", steps: int = 16, dtype: str = "auto",
        seed: int = 0, compile_model: bool = True, max_batch: int = 4, block_size: int = 8,
        progress: bool = True, threads: int | None = 1) -> dict:
    """Run the demo and return its report (a JSON-able dict); see the module docstring.

    ``threads`` sets torch's CPU intra-op threads for the duration of the run (None: leave as
    is). The default is 1 because the demo's matmuls are tiny ([<=40, 128] x [128, 320]): a
    [4, 128] x [128, 128] linear measured 7.7 us with 1 thread and 600 us with 2 on a loaded
    2-core machine, all of it threading overhead.

    Raises:
        DemoError: the device or backend is unavailable.
    """
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(device, backend, steps, dtype, seed, compile_model, max_batch, block_size,
                    progress)
    finally:
        torch.set_num_threads(saved_threads)


def _run(device, backend, steps, dtype, seed, compile_model, max_batch, block_size, progress):
    dev = resolve_device(device)
    torch_dtype = (torch.float32 if dev.type == "cpu" else torch.bfloat16) if dtype == "auto" \
        else DTYPES[dtype]
    tol = LOGIT_TOL[torch_dtype]
    cfg = DemoConfig()
    if backend != "auto":
        try:
            registry.get_backend_module(backend)
        except (ValueError, ImportError) as e:
            raise DemoError(f"backend {backend!r} cannot be loaded here: {e}") from None
    with registry.use_backend(backend), torch.inference_mode():
        backends = planned_backends(cfg, dev, torch_dtype, block_size)
        model = DemoLlama(cfg, seed=seed).to(device=dev, dtype=torch_dtype).eval()
        report = {"device": str(dev), "dtype": str(torch_dtype).replace("torch.", ""),
                  "backend_choice": backend, "backends": backends, "logit_tol": tol,
                  "model": {"layers": cfg.num_layers, "heads": cfg.num_heads,
                            "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                            "vocab": cfg.vocab_size,
                            "params": sum(p.numel() for p in model.parameters())}}
        if compile_model:
            gen = torch.Generator().manual_seed(seed + 2)
            ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=gen).to(dev)
            # Under "auto" the passes leave alone attention that only the reference backend
            # would run (on CPU: slower than SDPA). The demo is there to show the substitution,
            # so it names the backend the registry picked, which the passes take as asked.
            options = {"attn_ops.attn_backend": backends["compiled model: attn.prefill"]}
            try:
                report["compile"] = compile_and_check(model, (ids,), expected=cfg.num_layers,
                                                      tol=tol, options=options)
            except Exception as e:  # e.g. no C++ compiler for Inductor: report it, go on serving
                report["compile"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        requests = make_requests(cfg.vocab_size, steps, seed)
        # Enough blocks for the max_batch largest requests at once: admission never deadlocks,
        # and freed blocks are reused by later requests.
        needs = sorted(-(-r.cache_tokens // block_size) for r in requests)
        num_blocks = sum(needs[-max_batch:])
        # On stderr, so stdout holds only the summary.
        bar = tqdm(total=sum(r.max_new_tokens for r in requests), desc="generating", unit="tok",
                   file=sys.stderr, disable=not progress)
        try:
            cache = model.new_cache(num_blocks, block_size,
                                    max_seq_len=max(r.cache_tokens for r in requests))
            stats = serve(model, requests, cache, max_batch=max_batch, progress=bar)
        finally:
            bar.close()
        check = check_against_eager(model, requests, logit_tol=tol)
    report["serving"] = {
        "max_batch": max_batch, "block_size": block_size, "num_blocks": num_blocks,
        "requests": [{"id": r.rid, "prompt_len": len(r.prompt), "new_tokens": len(r.output),
                      "admitted_at": r.admitted_at, "finished_at": r.finished_at,
                      "tokens": r.output} for r in requests],
        "stats": vars(stats)}
    report["check"] = {**vars(check), "ok": check.ok}
    report["ok"] = check.ok and report.get("compile", {}).get("ok", True)
    return report
