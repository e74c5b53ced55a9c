"""The causal-mask prover on the three IRs it reads: Dynamo's, Inductor's aten, export's.

Each mask is built in a function of the input's shape only (or, for the negative cases, of its
data / an input / an in-place write), captured in all three IRs, and classified.
"""

import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from graph_passes.mask.causal_mask import cache_positions, causal_window, classify
from graph_passes.mask.domain import NotProvable

def _ar(t, x):
    return torch.arange(t, device=x.device)


def _window(x, t):
    i, j = _ar(t, x)[:, None], _ar(t, x)[None, :]
    return (j <= i) & (i - j < 3)


def _mutated(x, t):
    m = torch.ones(t, t, dtype=torch.bool).tril()
    m[0, 0] = False
    return m


def _packed_like(x, t):
    """Hugging Face's packed-sequence check on positions 0..t-1, then causal on those positions."""
    pos = _ar(t, x)[None, :].expand(x.shape[0], -1)
    seq = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    b = torch.arange(x.shape[0])[:, None, None, None]
    q, k = _ar(t, x)[None, None, :, None], _ar(t, x)[None, None, None, :]
    return (seq[b, q] == seq[b, k]) & (pos[b, k] <= pos[b, q])


# name -> (mask builder (x, t) -> mask, usage, expected: "causal" / "none" / NotProvable)
CASES = {
    "tril_bool": (lambda x, t: torch.ones(t, t, dtype=torch.bool).tril(), "keep", "causal"),
    "triu_neg_inf": (lambda x, t: torch.full((t, t), -math.inf).triu(1), "additive", "causal"),
    "arange_ge_4d": (lambda x, t: (_ar(t, x)[:, None] >= _ar(t, x)[None, :]).view(1, 1, t, t),
                     "keep", "causal"),
    "shifted_positions": (lambda x, t: (_ar(t, x)[:, None] + 5) >= (_ar(t, x)[None, :] + 5),
                          "keep", "causal"),
    "where_dtype_min": (lambda x, t: torch.where(_ar(t, x)[None, :] <= _ar(t, x)[:, None], 0.0,
                                                 torch.finfo(torch.float32).min), "additive",
                        "causal"),
    "zeros_masked_fill": (lambda x, t: torch.zeros(t, t).masked_fill(
        ~torch.ones(t, t, dtype=torch.bool).tril(), -math.inf), "additive", "causal"),
    "triu_bool_hidden": (lambda x, t: torch.ones(t, t, dtype=torch.bool).triu(1), "masked",
                         "causal"),
    "tril_float_eq0": (lambda x, t: torch.ones(t, t).tril()[None, None] == 0, "masked",
                       "causal"),
    "packed_positions": (_packed_like, "keep", "causal"),
    # Constants are values of the tensor's dtype and casts truncate (issue 12, item 5).
    "truncated_long": (lambda x, t: (torch.ones(t, t).tril() + 0.5).long().bool(), "keep",
                       "causal"),
    "fp64_no_tie": (lambda x, t: (torch.ones(t, t, dtype=torch.float64).tril() * 0.1 + 0.2) > 0.3,
                    "keep", "causal"),
    "half_overflow_hides": (lambda x, t: (torch.ones(t, t).triu(1) * -1e5).half(), "additive",
                            "causal"),
    "all_zero_additive": (lambda x, t: torch.zeros(1, 1, t, t), "additive", "none"),
    "all_true": (lambda x, t: torch.ones(t, t, dtype=torch.bool), "keep", "none"),
    # Negative: provably not causal, or not provable at all.
    "tril_diag1": (lambda x, t: torch.ones(t, t, dtype=torch.bool).tril(1), "keep", NotProvable),
    "sliding_window": (_window, "keep", NotProvable),
    "data_dependent": (lambda x, t: (x[0, :, :1] > 0).expand(t, t), "keep", NotProvable),
    "soft_additive": (lambda x, t: torch.full((t, t), -1e4).triu(1), "additive", NotProvable),
    "written_in_place": (_mutated, "keep", NotProvable),
    "fp32_tie_all_false": (lambda x, t: (torch.ones(t, t).tril() * 0.1 + 0.2) > 0.3, "keep",
                           NotProvable),
    "truncated_to_zero": (lambda x, t: (torch.ones(t, t).tril() * 0.9).long().bool(), "keep",
                          NotProvable),
    "transposed_causal": (lambda x, t: torch.ones(t, t, dtype=torch.bool).triu(), "keep",
                          NotProvable),
}
NAMES = sorted(CASES)


def _all_masks(x):
    t = x.shape[1]
    return [CASES[n][0](x, t) for n in NAMES]


def _outputs(graph):
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    return list(out)


@pytest.fixture(scope="module")
def captured():
    """Output nodes of the masks in each IR, in NAMES order."""
    x = torch.randn(2, 7, 3)
    graphs = {}

    def capture(gm, example_inputs):
        graphs["dynamo"] = gm
        return gm
    torch._dynamo.reset()
    torch.compile(_all_masks, backend=capture, dynamic=True, fullgraph=True)(x)
    from torch._inductor.decomposition import select_decomp_table
    graphs["inductor"] = make_fx(_all_masks, select_decomp_table())(x)

    class M(torch.nn.Module):
        def forward(self, x):
            return _all_masks(x)
    seq = torch.export.Dim("seq", min=2, max=64)
    graphs["export"] = torch.export.export(M(), (x,), dynamic_shapes=({1: seq},)).graph_module
    return {ir: _outputs(gm.graph) for ir, gm in graphs.items()}


@pytest.mark.parametrize("ir", ["dynamo", "inductor", "export"])
@pytest.mark.parametrize("name", NAMES)
def test_mask_classification(captured, ir, name):
    node = captured[ir][NAMES.index(name)]
    _, usage, expected = CASES[name]
    if expected is NotProvable:
        with pytest.raises(NotProvable):
            classify(node, usage)
    else:
        assert classify(node, usage) == expected


def test_the_reason_names_the_input_it_depends_on(captured):
    with pytest.raises(NotProvable, match="depends on the input"):
        classify(captured["dynamo"][NAMES.index("data_dependent")], "keep")


def test_masks_built_as_expected_values():
    """The builders themselves: causal ones equal tril, so the prover is checked against data."""
    x = torch.randn(2, 6, 3)
    ref = torch.ones(6, 6, dtype=torch.bool).tril()
    for name in NAMES:
        build, usage, expected = CASES[name]
        m = build(x, 6)
        if expected != "causal":
            continue
        if usage == "additive":
            keep = m == 0
        elif usage == "masked":
            keep = ~m
        else:
            keep = m
        assert torch.equal(keep.expand(2, 1, 6, 6), ref.expand(2, 1, 6, 6)), name


# ---------------------------------------------------------------------------------------------
# Masks over a cache: query i (at position pos[i]) sees key j iff j <= pos[i]
# ---------------------------------------------------------------------------------------------

S_MAX = 16


def _kv(pos):
    return torch.arange(S_MAX, device=pos.device)


def _mutated_pos(x, pos, n):
    pos = pos.clone()
    p = pos + 0
    p.add_(1)
    return _kv(p)[None, :] <= p[:, None]


# name -> (builder (x, pos, length) -> mask, usage, expected CacheMask.kind (or (kind,
# window_left)) or NotProvable);
# pos: 1-D positions (gpt-fast's input_pos), length: a 0-d count of cached tokens (transformers'
# StaticCache.cumulative_length), the queries then at length + arange(Sq).
CACHE_CASES = {
    "gpt_fast_indexed_tril": (
        lambda x, pos, n: torch.ones(S_MAX, S_MAX, dtype=torch.bool).tril()[None, None, pos],
        "keep", "each"),
    "arange_le_pos": (lambda x, pos, n: _kv(pos)[None, :] <= pos[:, None], "keep", "each"),
    "hf_additive_min": (lambda x, pos, n: torch.where(_kv(pos)[None, :] <= pos[:, None], 0.0,
                                                   torch.finfo(torch.float32).min), "additive",
                        "each"),
    "masked_fill_future": (lambda x, pos, n: torch.zeros(pos.shape[0], S_MAX).masked_fill(
        _kv(pos)[None, :] > pos[:, None], -math.inf)[None, None], "additive", "each"),
    "one_row_for_every_query": (lambda x, pos, n: (_kv(pos)[None, :] <= pos[:1, None]),
                                "keep", "first"),
    "static_cache_offset": (lambda x, pos, n: _kv(pos)[None, :] <= (
        torch.arange(pos.shape[0]) + n)[:, None], "keep", "offset"),
    # Negative: not "j <= pos[i]", or not positions at all.
    "window_over_cache": (lambda x, pos, n: (_kv(pos)[None, :] <= pos[:, None])
                          & (pos[:, None] - _kv(pos)[None, :] < 4), "keep", ("each", 3)),
    "window_not_ending_at_the_position": (lambda x, pos, n: (_kv(pos)[None, :] < pos[:, None])
                                          & (pos[:, None] - _kv(pos)[None, :] < 4), "keep",
                                          NotProvable),
    "strictly_before": (lambda x, pos, n: _kv(pos)[None, :] < pos[:, None], "keep", NotProvable),
    "positions_on_the_key_dim": (lambda x, pos, n: _kv(pos)[:, None] <= pos[None, :], "keep",
                                 NotProvable),
    "float_input": (lambda x, pos, n: torch.arange(x.shape[1])[None, :] <= x[0, :, 0][:, None],
                    "keep", NotProvable),
    "positions_written_in_place": (_mutated_pos, "keep", NotProvable),
}
CACHE_NAMES = sorted(CACHE_CASES)


def _all_cache_masks(x, pos, length):
    return [CACHE_CASES[n][0](x, pos, length) for n in CACHE_NAMES]


@pytest.fixture(scope="module")
def captured_cache():
    args = torch.randn(2, 5, 3), torch.tensor([3, 4, 5, 6, 7]), torch.tensor(3)
    graphs = {}

    def capture(gm, example_inputs):
        graphs["dynamo"] = gm
        return gm
    torch._dynamo.reset()
    torch.compile(_all_cache_masks, backend=capture, fullgraph=True)(*args)
    from torch._inductor.decomposition import select_decomp_table
    graphs["inductor"] = make_fx(_all_cache_masks, select_decomp_table())(*args)

    class M(torch.nn.Module):
        def forward(self, x, pos, length):
            return _all_cache_masks(x, pos, length)
    graphs["export"] = torch.export.export(M(), args).graph_module
    return {ir: _outputs(gm.graph) for ir, gm in graphs.items()}


@pytest.mark.parametrize("ir", ["dynamo", "inductor", "export"])
@pytest.mark.parametrize("name", CACHE_NAMES)
def test_cache_position_masks(captured_cache, ir, name):
    node = captured_cache[ir][CACHE_NAMES.index(name)]
    _, usage, expected = CACHE_CASES[name]
    if expected is NotProvable:
        with pytest.raises(NotProvable):
            cache_positions(node, usage)
        return
    kind, window_left = expected if isinstance(expected, tuple) else (expected, -1)
    found = cache_positions(node, usage)
    assert found.pos.op == "placeholder" and found.kind == kind
    assert found.assumed == () and found.written == () and found.window_left == window_left
    with pytest.raises(NotProvable, match="attention over a cache"):
        classify(node, usage)  # not the plain causal mask: the dense passes leave it alone


def test_cache_masks_built_as_expected_values():
    """The positive builders against data: key j is kept iff j <= the query's position."""
    x, pos, length = torch.randn(2, 5, 3), torch.tensor([2, 9, 0, 15, 4]), torch.tensor(6)
    for name in CACHE_NAMES:
        build, usage, expected = CACHE_CASES[name]
        if expected is NotProvable:
            continue
        m = build(x, pos, length)
        keep = (m == 0) if usage == "additive" else m
        kind, w = expected if isinstance(expected, tuple) else (expected, -1)
        rows = {"each": pos, "first": pos[:1], "offset": length + torch.arange(5)}[kind]
        want = torch.arange(S_MAX)[None, :] <= rows[:, None]
        if w >= 0:
            want &= rows[:, None] - torch.arange(S_MAX)[None, :] <= w
        assert torch.equal(keep.reshape(-1, S_MAX), want), name


@pytest.mark.parametrize("ir", ["dynamo", "inductor", "export"])
def test_causal_window(captured, ir):
    """``(j <= i) & (i - j < 3)`` is the op's window_left = 2; the causal mask is not a window."""
    assert causal_window(captured[ir][NAMES.index("sliding_window")], "keep") == 2
    for name in ("tril_bool", "tril_diag1", "transposed_causal"):
        with pytest.raises(NotProvable):
            causal_window(captured[ir][NAMES.index(name)], CASES[name][1])
