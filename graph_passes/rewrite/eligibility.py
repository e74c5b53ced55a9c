"""May this dense attention call become ``attn.prefill``? None, or the reason it may not.

Shared by every pass: the rules are those of the op contract (``attn_ops.checks``) and of the
chosen backend's ``supports()``, read from the fake values the tracer recorded, so a call that
would fail or fall back to a slower kernel at run time is left alone at compile time instead.
"""

from __future__ import annotations

import logging

import torch

from attn_ops import contract, registry
from attn_ops.contract import OpConfig
from torch.fx.experimental.symbolic_shapes import statically_known_true

from graph_passes.fx_nodes import same
from graph_passes.options import SubstitutionOptions

log = logging.getLogger("graph_passes")


def left_alone(pass_name: str, where: str, reason: str) -> None:
    """Log (debug) and count a call that a pass leaves untouched."""
    from torch._dynamo.utils import counters
    counters["graph_passes"][f"{pass_name}_left_alone"] += 1
    log.debug("%s: left %s alone because %s", pass_name, where, reason)


def _prefill_config(q: torch.Tensor, k: torch.Tensor, causal: bool,
                    window_left: int = -1) -> OpConfig:
    """The config of the ``attn.prefill`` that would replace attention over q/k ``[B, H, S, D]``."""
    return OpConfig("prefill", q.device, q.dtype, int(q.shape[3]), int(k.shape[1]),
                    num_heads=int(q.shape[1]), causal=bool(causal), window_left=window_left)


# Backends that run the ops with plain torch. The reference never beats the attention it would
# replace (fp32 scores, O(S^2) memory: 1.8-7.3x Inductor's time on the benchmark model). The
# sdpa backend can on the CPU for a cache-free prefill, which the passes always emit dense
# (every sequence S long): it runs PyTorch's fused CPU kernel, the one Inductor calls itself,
# on views of q/k/v (attn_ops/backends/sdpa.py). What it adds is a fixed host cost per call
# (the op's dispatch and Python, the non-finite check: ~0.1-0.2 ms with the caches cold after
# the projections), so it wins only where the attention is large enough. Measured with
# benchmarks/bench_substitution.py (Llama-style, 2 layers, hidden 256, 8/2 heads, D 32, fp32,
# B=1, one thread; results/substitution_cpu_{sdpa,eager}_t1.csv, 2026-11-30), time over
# Inductor's at S = 128 / 256 / 512 / 1024: a model written with SDPA 1.086 / 1.054 / 1.034 /
# 1.012, one written by hand (HF eager) 1.062 / 0.948 / 0.830 / 0.544. Paged prefill on it
# gathers padded tiles: left alone. Decode over a cache is left alone too, though on CPU
# tensors it now reads pos + 1 keys through a view of the cache (sdpa.py, _host_decode): on the
# gpt-fast-style step (benchmarks/bench_cache_substitution.py --device cpu --size cpu
# --threads 1: 2 layers, B 4, Hkv 2, S_max 2048, D 64, fp32; results/cache_substitution_cpu.csv,
# 2026-11-30; the sdpa backend, chosen by "auto" under a trial rule) Inductor's time over the
# substituted step at pos 128 / 1024 / 1900 / 2047 is 3.76 / 2.92 / 2.12 / 2.32x written with
# repeat_interleave, but 1.67 / 1.38 / 0.94 / 0.96x written with enable_gqa: near S_max both
# read the whole cache and the op's fixed cost loses ~5%. Positions are dynamic and the form is
# not known here, so no rule on S_max alone holds at every position; attn_backend='sdpa'
# substitutes it.
_PURE_TORCH = ("reference", "sdpa")
# Under "auto", the least attention work per call (B * H * Sq * Sk * D, the multiply-adds of
# q k^T) for which a CPU prefill goes to the sdpa backend: S = 512 above (2^26) is the first
# measured length within 3% of Inductor for both forms. Symbolic shapes are substituted (the
# loss below the line is bounded by the fixed cost; the win above it grows with S).
CPU_MIN_WORK = 1 << 26


def _pure_torch_wins(name: str, config: OpConfig) -> bool:
    """Whether backend ``name`` (a pure-torch one) can beat what it replaces under "auto"."""
    return (name == "sdpa" and config.device.type == "cpu" and config.op == "prefill"
            and not config.paged)


def _auto_choice(config: OpConfig, choice: str | None) -> str | None:
    """The backend "auto" would run ``config`` on, or None under an explicit choice."""
    if (choice or registry.current_choice()) != "auto":
        return None
    return registry.select(config, "auto").name


def backend_reason(config: OpConfig, choice: str | None, only_if_faster: bool = True) -> str | None:
    """None when the op ``config`` describes would run on a backend worth substituting for.

    An explicit choice (option, ``use_backend``, ``ATTN_OPS_BACKEND``) is taken as asked, the
    reference included. Under "auto" the substitution must not make the model slower, so a
    call that only the reference backend would serve (fp32 scores, O(S^2) memory; 2-9x slower
    than PyTorch's fused CPU attention on the benchmark model), or the sdpa backend outside a
    CPU cache-free prefill (padded tiles), is left alone.
    """
    choice = choice or registry.current_choice()
    if choice != "auto":
        try:
            module = registry.get_backend_module(choice)
        except ImportError as e:
            return f"attn backend {choice!r} cannot be imported ({e})"
        reason = module.supports(config)
        return None if reason is None else f"attn backend {choice!r} does not support it: {reason}"
    for name in registry.auto_order(config):
        try:
            module = registry.get_backend_module(name)
        except ImportError:
            continue
        if module.supports(config) is None:
            if name in _PURE_TORCH and only_if_faster and not _pure_torch_wins(name, config):
                return (f"only a pure-torch backend ({name}) would run it on "
                        f"{config.device.type} "
                        f"(dtype {config.dtype}, head dim {config.head_dim}), slower than "
                        f"the attention it replaces; choose it explicitly (attn_backend="
                        f"'reference' or ATTN_OPS_BACKEND=reference) to substitute anyway")
            return None
    return f"no attn backend supports it on {config.device}"


def _contract_reason(q, k, v) -> str | None:
    """What the op contract rules out for ``q [B,H,Sq,D]``, ``k``/``v`` ``[B,Hkv,Sk,D]``."""
    vals = (q, k, v)
    if not all(isinstance(t, torch.Tensor) for t in vals):
        return "q, k, v carry no tensor metadata"
    if any(t.dim() != 4 for t in vals):
        return f"q/k/v are not 4-D [B, H, S, D] (shapes {[list(t.shape) for t in vals]})"
    if any(t.dtype not in contract.FLOAT_DTYPES or t.dtype != q.dtype for t in vals):
        return f"dtypes {[t.dtype for t in vals]} are not one of fp32/fp16/bf16 for all three"
    if k.device != q.device or v.device != q.device:
        return "q, k, v are on different devices"
    if any(not same(t.stride(-1), 1) and not same(t.shape[-1], 1) for t in vals):
        return "a head dim is not contiguous (stride 1), which attn.prefill requires"
    if torch.is_grad_enabled() and any(t.requires_grad for t in vals):
        return "gradients are needed and the attn ops are inference-only"
    b, h, sq, d = q.shape
    if tuple(k.shape) != tuple(v.shape) and not all(same(x, y) for x, y in zip(k.shape, v.shape)):
        return f"k {list(k.shape)} and v {list(v.shape)} differ (attn.prefill needs equal shapes)"
    if not same(k.shape[0], b) or not same(k.shape[3], d):
        return f"k {list(k.shape)} does not match q {list(q.shape)} in batch or head dim"
    hkv = k.shape[1]
    if not isinstance(h, int) or not isinstance(hkv, int) or hkv <= 0 or h % hkv:
        return f"{h} query heads are not a multiple of {hkv} kv heads"
    if not isinstance(d, int):
        return "the head dim is symbolic"
    if not (0 < d <= contract.MAX_HEAD_DIM and d % contract.HEAD_DIM_MULTIPLE == 0):
        return (f"head dim {d} is outside the op contract (a multiple of "
                f"{contract.HEAD_DIM_MULTIPLE} up to {contract.MAX_HEAD_DIM})")
    return None


def refuse_reason(q, k, v, causal: bool, options: SubstitutionOptions,
                  window_left: int = -1) -> str | None:
    """Why ``q [B,H,Sq,D]``, ``k``/``v`` ``[B,Hkv,Sk,D]`` (fake tensors) can't go to prefill."""
    reason = _contract_reason(q, k, v)
    if reason is not None:
        return reason
    sq = q.shape[2]
    if not statically_known_true(sq <= k.shape[2]):
        return (f"Sq={sq} may exceed Sk={k.shape[2]} (attn.prefill's queries are the last Sq "
                f"of the Sk tokens)")
    if causal and not same(sq, k.shape[2]):
        # Dense SDPA is_causal is top-left aligned, attn.prefill bottom-right: equal only when
        # Sq == Sk.
        return f"it is causal with Sq={sq} and Sk={k.shape[2]} not provably equal"
    config = _prefill_config(q, k, causal, window_left)
    only_if_faster = options.only_if_faster is not False
    reason = backend_reason(config, options.backend_choice, only_if_faster)
    if reason is None and only_if_faster and config.device.type == "cpu" and \
            _auto_choice(config, options.backend_choice) in _PURE_TORCH:
        work = q.shape[0] * q.shape[1] * sq * k.shape[2] * q.shape[3]
        if statically_known_true(work < CPU_MIN_WORK):
            return (f"on the CPU under 'auto' its attention is too small ({work} multiply-adds "
                    f"of q k^T < {CPU_MIN_WORK}) for the sdpa backend to beat the attention it "
                    f"replaces (the op's fixed host cost); choose attn_backend='sdpa' to "
                    f"substitute anyway")
    return reason


def refuse_cache_reason(q, k, v, options: SubstitutionOptions,
                        window_left: int = -1) -> str | None:
    """Why queries ``q [B,H,Sq,D]`` over caches ``k``/``v`` ``[B,Hkv,S,D]`` (fake tensors) can't
    go to ``attn.decode`` (Sq = 1) or a paged ``attn.prefill`` reading them as ``B`` blocks of
    ``S`` tokens."""
    reason = _contract_reason(q, k, v)
    if reason is not None:
        return reason
    b, hkv, s, d = k.shape
    if not statically_known_true(q.shape[2] <= s):
        return f"Sq={q.shape[2]} may exceed the cache length {s}"
    if not isinstance(s, int):
        return "the cache length is symbolic (it is the block size of the decode)"
    # The ops read caches through their strides: k.transpose(1, 2) is the [blocks, tokens, Hkv,
    # D] view they take, one block per sequence, whatever the memory order (the contract asks
    # only a contiguous head dim, checked above). Token-major in memory makes that view
    # contiguous, which every backend reads; heads-major (gpt-fast, transformers' StaticCache)
    # makes it strided, which some backends refuse (their supports() says why, below).
    token_major = all(
        all(same(x, y) for x, y in zip((t.stride(2), t.stride(1), t.stride(3)), (hkv * d, d, 1)))
        and (same(b, 1) or same(t.stride(0), s * hkv * d)) for t in (k, v))
    op = "decode" if same(q.shape[2], 1) else "prefill"
    config = OpConfig(op, q.device, q.dtype, int(d), int(hkv), num_heads=int(q.shape[1]),
                      paged=True, block_size=s, window_left=window_left,
                      cache_contiguous=token_major)
    return backend_reason(config, options.backend_choice, options.only_if_faster is not False)
