"""attn::merge_states: attention over [0, n) == merge(attention over [0, m), over [m, n)), the
empty-part rules, isolation, opcheck, compile and export (the reference backend; the Triton
kernel is tested in tests/attn_ops/backends/triton/test_merge_kernel.py)."""

import pytest
import torch
from torch.library import opcheck

import attn_ops
from tests.support.helpers import assert_close, cu_seqlens, prefill_f64

INF = float("inf")


def _split_keys(k, v, lens_k, cut):
    """Per sequence b, keys [0, cut[b]) and [cut[b], lens_k[b]) as two packed batches."""
    parts = ([], [], [], [])
    start = 0
    for n, m in zip(lens_k, cut):
        parts[0].append(k[start:start + m])
        parts[1].append(v[start:start + m])
        parts[2].append(k[start + m:start + n])
        parts[3].append(v[start + m:start + n])
        start += n
    return [torch.cat(p) for p in parts]


@pytest.mark.parametrize("seed", range(6))
def test_merge_of_a_split_is_the_whole(seed):
    """Random lengths (lq > lk too: no mask) and cut points (0 and lk included: an empty part);
    sinks in one part."""
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 5, (1,), generator=g))
    lens_k = torch.randint(0, 13, (b,), generator=g).tolist()
    lens_q = torch.randint(0, 5, (b,), generator=g).tolist()
    lens_q[0] = max(lens_q[0], 1)  # at least one real row to compare, whatever the draw
    cut = [int(torch.randint(0, n + 1, (1,), generator=g)) for n in lens_k]
    if seed == 0:
        cut = [0] * b  # part a empty everywhere
    if seed == 1:
        cut = list(lens_k)  # part b empty everywhere
    hkv, group, d = 2, 2, 24
    h = hkv * group
    softcap = 4.0 if seed % 2 else 0.0
    sinks = torch.randn(h) if seed % 3 else None
    if sinks is not None:
        # A part that sees no key has lse -inf and drops its sink: the sinks go to a part that
        # holds at least one key of every non-empty sequence.
        cut = [max(m, min(n, 1)) for m, n in zip(cut, lens_k)]
    q = torch.randn(sum(lens_q) + 1, h, d)  # one row past cu_seqlens_q[-1]
    k, v = torch.randn(sum(lens_k), hkv, d), torch.randn(sum(lens_k), hkv, d)
    ka, va, kb, vb = _split_keys(k, v, lens_k, cut)
    rest = [n - m for n, m in zip(lens_k, cut)]
    cu_q = cu_seqlens(lens_q)
    mq = max(lens_q)

    def part(kk, vv, lens, s):
        return attn_ops.prefill_with_lse(q, kk, vv, cu_q, cu_seqlens(lens), mq, max(lens), 0.3,
                                         False, None, -1, softcap, s, backend="reference")

    out_a, lse_a = part(ka, va, cut, sinks)
    out_b, lse_b = part(kb, vb, rest, None)
    out, lse = attn_ops.merge_states(out_a, lse_a, out_b, lse_b, backend="reference")
    want, want_lse = prefill_f64(q, k, v, lens_q, lens_k, 0.3, False, -1, softcap, sinks,
                                 return_lse=True)
    assert_close(out, want, 2e-5, 2e-5)
    assert_close(lse, want_lse, 2e-5, 2e-5, "lse")
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))


def test_merge_is_symmetric_and_associative():
    n, h, d = 13, 3, 40
    outs = [torch.randn(n, h, d) for _ in range(3)]
    lses = [torch.randn(n, h) * 3 for _ in range(3)]
    lses[1][2] = -INF
    ab = attn_ops.merge_states(outs[0], lses[0], outs[1], lses[1], backend="reference")
    ba = attn_ops.merge_states(outs[1], lses[1], outs[0], lses[0], backend="reference")
    assert_close(ab[0], ba[0], 1e-6, 1e-6)
    assert_close(ab[1], ba[1], 1e-6, 1e-6)
    left = attn_ops.merge_states(*ab, outs[2], lses[2], backend="reference")
    bc = attn_ops.merge_states(outs[1], lses[1], outs[2], lses[2], backend="reference")
    right = attn_ops.merge_states(outs[0], lses[0], *bc, backend="reference")
    assert_close(left[0], right[0], 1e-5, 1e-5)
    assert_close(left[1], right[1], 1e-5, 1e-5)


def test_empty_parts():
    """-inf and -inf: zeros and -inf; one -inf: the other part exactly, however poisoned the
    empty part's output is (it is not read)."""
    n, h, d = 5, 2, 16
    out_a = torch.randn(n, h, d, dtype=torch.bfloat16)
    lse_a = torch.randn(n, h)
    poison = torch.full((n, h, d), float("nan"), dtype=torch.bfloat16)
    empty = torch.full((n, h), -INF)
    out, lse = attn_ops.merge_states(poison, empty, poison, empty, backend="reference")
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, empty)
    out, lse = attn_ops.merge_states(out_a, lse_a, poison, empty, backend="reference")
    assert torch.equal(out, out_a) and torch.equal(lse, lse_a)
    out, lse = attn_ops.merge_states(poison, empty, out_a, lse_a, backend="reference")
    assert torch.equal(out, out_a) and torch.equal(lse, lse_a)


def test_nan_is_never_hidden():
    n, h, d = 3, 2, 8
    out_a, out_b = torch.randn(n, h, d), torch.randn(n, h, d)
    lse_a, lse_b = torch.randn(n, h), torch.randn(n, h)
    lse_a[1, 0] = float("nan")
    out_b[2, 1, 3] = float("nan")
    out, lse = attn_ops.merge_states(out_a, lse_a, out_b, lse_b, backend="reference")
    assert torch.isnan(lse[1, 0]) and torch.isnan(out[1, 0]).all()
    assert torch.isnan(out[2, 1, 3])
    assert not torch.isnan(out[0]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,h,d", [(1, 1, 8), (13, 4, 40), (0, 2, 16)])
def test_opcheck_merge_states(dtype, n, h, d):
    lse_a, lse_b = torch.randn(n, h), torch.randn(n, h)
    if n:
        lse_a[0] = -INF
    opcheck(torch.ops.attn.merge_states.default,
            (torch.randn(n, h, d, dtype=dtype), lse_a, torch.randn(n, h, d, dtype=dtype), lse_b))


MERGE_BAD = [
    (dict(out_a=torch.randn(4, 2)), r"out_a: expected a 3-D tensor of shape \[N, H, D\]"),
    (dict(out_b=torch.randn(4, 3, 8)), r"out_b: expected shape \[4, 2, 8\] \(that of out_a\)"),
    (dict(out_b=torch.randn(4, 2, 8, dtype=torch.float16)), r"out_b: expected dtype"),
    (dict(lse_a=torch.randn(4, 3)), r"lse_a: expected shape \[4, 2\] \(N, H of out_a\)"),
    (dict(lse_b=torch.randn(4, 2, dtype=torch.float64)), r"lse_b: expected float32"),
    (dict(lse_b=torch.randn(4, 2, 1)), r"lse_b: expected a 2-D tensor of shape \[N, H\]"),
]


def _merge_args(**over):
    args = dict(out_a=torch.randn(4, 2, 8), lse_a=torch.randn(4, 2), out_b=torch.randn(4, 2, 8),
                lse_b=torch.randn(4, 2))
    args.update(over)
    return list(args.values())


@pytest.mark.parametrize("over,msg", MERGE_BAD)
def test_merge_bad_input(over, msg):
    with pytest.raises(ValueError, match=msg):
        torch.ops.attn.merge_states(*_merge_args(**over))
    torch._dynamo.reset()
    fn = torch.compile(torch.ops.attn.merge_states.default, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=msg):
        fn(*_merge_args(**over))


def test_compile_and_export():
    def f(out_a, lse_a, out_b, lse_b):
        out, lse = torch.ops.attn.merge_states(out_a, lse_a, out_b, lse_b)
        return out * 2, lse

    args = _merge_args()
    want = f(*args)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(*args)
    assert_close(got[0], want[0], 1e-6, 1e-6)
    assert_close(got[1], want[1], 1e-6, 1e-6)
    ep = torch.export.export(_Merge(), tuple(args))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.attn.merge_states.default in targets
    got = ep.module()(*args)
    assert_close(got[0], want[0] / 2, 1e-6, 1e-6)


class _Merge(torch.nn.Module):
    def forward(self, out_a, lse_a, out_b, lse_b):
        return torch.ops.attn.merge_states(out_a, lse_a, out_b, lse_b)


def test_merge_states_is_inference_only():
    out_a = torch.randn(2, 2, 8, requires_grad=True)
    out, _ = torch.ops.attn.merge_states(out_a, torch.randn(2, 2), torch.randn(2, 2, 8),
                                         torch.randn(2, 2))
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()
