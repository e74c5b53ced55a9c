"""The Hopper route's host side off the GPU: the entry bound to a call signature
(bind_prefill_guarded) plans exactly the launches of the unbound guarded entry, and the calls
it cannot serve directly take the unbound entry. The launches are recorded, not run (Gluon
kernels need an sm90 GPU; the GPU tests in test_hopper_prefill_kernel.py run them)."""

import math

import pytest
import torch

pytest.importorskip("triton")
from attn_ops.backends.triton import hopper_prefill_launch as hp  # noqa: E402
from attn_ops.backends.triton import launch as launch_mod  # noqa: E402
from tests.support.helpers import cu_seqlens, random_paged  # noqa: E402

if not hp.GLUON:
    pytest.skip("Gluon's Hopper API is not importable", allow_module_level=True)


def _inputs(dtype=torch.bfloat16, lens=(13, 0, 123), h=8, hkv=2, d=128, extra_rows=3, page=0):
    q = torch.randn(sum(lens) + extra_rows, h, d).to(dtype)
    cu = cu_seqlens(list(lens))
    if page:  # a prefix of 50 keys per sequence in a paged cache
        lens_k = [n + 50 for n in lens]
        paged = random_paged(lens_k, hkv, d, page, dtype)
        return (q, paged.k_cache, paged.v_cache, cu, cu_seqlens(lens_k), max(lens), max(lens_k),
                d ** -0.5, True, paged.block_table)
    k = torch.randn(sum(lens), hkv, d).to(dtype)
    v = torch.randn(sum(lens), hkv, d).to(dtype)
    return (q, k, v, cu, cu, max(lens), max(lens), d ** -0.5, True)


def _descriptor(d):
    """What the compiled launcher reads of a descriptor, and what specialises the kernel."""
    return ("desc", d.base.data_ptr(), list(d.shape), list(d.strides), list(d.block_shape),
            d.layout, d.padding)


def _normal(a):
    if isinstance(a, torch.Tensor):
        return ("tensor", a.data_ptr(), tuple(a.shape), a.dtype)
    if hasattr(a, "block_shape"):
        return _descriptor(a)
    return a


class _Recorder:
    """Stands in for the launches: every one becomes (kernel name, grid, arguments in order,
    constexprs and options). ``pinned``: the prepared launches are as raw_launch serves them
    once pinned, their ``at`` (the launch from addresses) recorded as "gluon.at" / "fixup.at"
    with the stream among the options."""

    def __init__(self, monkeypatch, pinned=False):
        self.calls = []
        rec = self

        class Kernel:  # hp.hopper_prefill_kernel[grid](*args, **consts)
            def __getitem__(self, grid):
                return lambda *args, **consts: rec.add("gluon", grid, args, consts)

        def launch(kernel, grid, *args, **consts):  # launch.launch (the fixup)
            rec.add(kernel.__name__ if hasattr(kernel, "__name__") else "fixup", grid, args,
                    consts)

        def prepare(kernel, grid, consts, check=None, fixed=()):
            name = "gluon" if kernel is hp.hopper_prefill_kernel else "fixup"

            def go(args):
                rec.add(name, grid, args + fixed, consts)

            def at(addresses, stream):
                rec.add(f"{name}.at", grid, addresses + fixed, dict(consts, stream=stream))
            go.device, go.at = (0, at) if pinned else (None, None)
            return go

        monkeypatch.setattr(hp, "hopper_prefill_kernel", Kernel())
        monkeypatch.setattr(launch_mod, "launch", launch)
        monkeypatch.setattr(launch_mod, "prepare", prepare)

    def add(self, name, grid, args, consts):
        name = "fixup" if name == "_prefill_kernel" else name
        self.calls.append((name, tuple(grid), [_normal(a) for a in args], dict(consts)))


_FLAGS_AT = {"gluon": 6, "fixup": 11}  # the flags' position in each launch's arguments


def _flags_free(calls):
    """The calls with the flags (int32, at least as many as flags_shape says; the unbound entry
    allocates them, the bound one takes split_counters.scratch) replaced by a marker."""
    out = []
    for n, g, args, c in calls:
        args = list(args)
        kind, _, shape, dtype = args[_FLAGS_AT[n]]
        assert kind == "tensor" and dtype == torch.int32
        args[_FLAGS_AT[n]] = ("flags", math.prod(shape))
        out.append((n, g, args, c))
    return out


@pytest.mark.parametrize("dtype, d, page, lens", [
    (torch.bfloat16, 128, 0, (13, 0, 123)), (torch.float16, 64, 0, (13, 0, 123)),
    (torch.bfloat16, 128, 16, (13, 0, 123)), (torch.float16, 64, 256, (13, 0, 123)),
    (torch.bfloat16, 128, 0, (13, 0, 600)), (torch.bfloat16, 128, 16, (13, 0, 500)),
    (torch.float16, 64, 0, (13, 0, 600)), (torch.float16, 64, 16, (13, 0, 600))])
def test_the_bound_entry_plans_the_unbound_entrys_launches(monkeypatch, dtype, d, page, lens):
    rec = _Recorder(monkeypatch)
    args = _inputs(dtype, d=d, page=page, lens=lens)
    n = hp.consumers(d, True, args[6], bool(page))
    assert n == (1 if args[6] <= (2048 if d == 64 and not page else 512) else 2)
    hp.prefill_guarded(*args)
    unbound = rec.calls[:]
    rec.calls.clear()
    run = hp.bind_prefill_guarded(*args)
    out = run(*args)
    assert out.shape == args[0].shape and out.dtype == dtype
    bound = rec.calls[:]
    assert [c[0] for c in unbound] == ["gluon", "fixup"]
    # Both outputs are fresh; compare everything but the output's address.
    for calls in (unbound, bound):
        for _, _, a, _ in calls:
            a[3] = ("out",) + a[3][2:]
    flags = math.prod(hp.flags_shape(args[5], args[3].shape[0] - 1, args[0].shape[1], n))
    assert _flags_free(unbound)[0][2][6] == ("flags", flags)
    assert _flags_free(bound) == _flags_free(unbound)
    gluon, consts = bound[0][2], bound[0][3]
    assert gluon[0][1] == args[0].data_ptr() and gluon[0][2] == [args[0].shape[0], 8 * d]
    assert gluon[1][1] == args[1].data_ptr() and gluon[2][1] == args[2].data_ptr()
    block_n = hp.solo_config(d, args[6])[0] if n == 1 else 128
    if page:  # the caches as [blocks * page, Hkv * D] rows, blocks of page pieces; the table
        blocks = args[1].shape[0]
        assert gluon[1][2:5] == ([blocks * page, 2 * d], [2 * d, 1], [min(page, block_n), d])
        assert consts["PAGE"] == page and consts["PAGE_ROWS"] == min(page, block_n)
        assert gluon[7][1] == args[9].data_ptr()
        assert bound[1][2][6][1] == args[9].data_ptr(), "the fixup reads the block table"
    else:
        assert consts["PAGE"] == 0
    # The fixup rewrites half tiles of n * 32 rows, the kernel's items being n * 64 rows.
    assert bound[1][3]["BLOCK_M"] == n * 32 and consts["CONSUMERS"] == n
    # ... and reads the flags of each half: a warp's 16 rows with one consumer, a warpgroup's
    # 64 with two.
    assert bound[1][3]["FLAGS_PER_HALF"] == {1: 2, 2: 1}[n]
    if n == 1:  # two programs per SM: 2 x 8 warps (4 + 1 rounded) x 128 registers = 64 K
        assert consts["maxnreg"] == 128 and 2 * 256 * consts["maxnreg"] <= 65536
        assert (consts["BLOCK_N"], consts["STAGES"], consts["STAGE_OUT"]) == (block_n, 2, True)
        assert block_n == (128 if d == 64 and args[6] > 512 else 64)
        return
    # The worker partitions' registers: 248 between them (the default partition takes 256 of
    # 3 * MAXNREG; a larger sum and setmaxnreg.inc would wait forever); the producer gets 32
    # where it walks a block table, 24 over dense K/V.
    regs = consts["CONSUMER_REGS"], consts["PRODUCER_REGS"]
    assert sum(regs) == 3 * consts["maxnreg"] - 256 and consts["maxnreg"] * 384 <= 65536
    assert regs == ((216, 32) if page else (224, 24))
    # A third K/V stage for paged chunks of at most 1024 queries at D 128 (measured there).
    assert consts["STAGES"] == (3 if page and d == 128 else hp._CONFIGS[d][1])
    # The output goes through a shared-memory tile but beside that 3-stage ring (224 KB).
    assert consts["STAGE_OUT"] == (not (page and d == 128))
    if page and d == 128:  # longer chunks keep two stages, and stage the output
        plan = hp._plan(args[0], args[1], args[3], args[4], 2048, args[7], True,
                        args[0].stride(), args[9], 0, 2)
        assert plan[2]["STAGES"] == 2 and plan[2]["STAGE_OUT"]


def test_short_causal_prompts_take_one_consumer_per_program_and_two_programs_per_sm():
    # The rule (measured on the H200: hopper_prefill_launch.SOLO_MAX_KEYS): causal, at most
    # 512 keys per sequence at D 128, 2048 at D 64 (512 over a paged cache); the grid is then
    # two programs per SM, and the items are 64-row tiles (flags: one per warp, of 16 rows; two
    # consumers flag per warpgroup, 64 rows).
    assert hp.consumers(128, True, 512) == 1
    assert hp.consumers(128, True, 513) == 2 and hp.consumers(128, False, 256) == 2
    assert hp.consumers(64, True, 256) == 1 and hp.consumers(96, True, 256) == 2
    assert hp.consumers(64, True, 2048) == 1 and hp.consumers(64, True, 2049) == 2
    assert hp.consumers(64, True, 512, paged=True) == 1
    assert hp.consumers(64, True, 513, paged=True) == 2
    # Its key steps: 64 keys, but 128 at D 64 past 512 keys; two stages.
    assert [hp.solo_config(d, keys) for d, keys in ((128, 512), (128, 2048), (64, 512),
                                                    (64, 513))] == [(64, 2)] * 3 + [(128, 2)]
    from attn_ops.backends.triton.common import device_sm_count
    lens = [256] * 10  # more items than two programs per SM (only the shapes are read)
    q, k = torch.empty(sum(lens), 8, 128), torch.empty(sum(lens), 2, 128)
    cu = cu_seqlens(lens)
    sms = device_sm_count(q.device)
    for n in (1, 2):
        grid, scalars, consts, shape, _ = hp._plan(q, k, cu, cu, 256, 0.1, True, q.stride(),
                                                   None, 0, n)
        assert shape == (256 // (64 * n), 11, 8, 2 * (3 - n)) and scalars[10] == shape[0]
        assert grid == (min(math.prod(shape[:3]), (3 - n) * sms),)
        assert consts["CONSUMERS"] == n


def test_the_staged_output_tile_is_planned_only_where_shared_memory_holds_it():
    # Q (2 x 64 rows) + the K/V ring + a 64-row output tile, against sm90's 227 KB: what
    # ptxas reported for these kernels (sm_90a, off the GPU) was 180320 bytes at D 128 with 2
    # stages and 131232 at D 64 with 3; D 128 with 3 stages would need 245920.
    assert hp._stage_out(128, 128, 2) and hp._stage_out(64, 128, 3)
    assert not hp._stage_out(128, 128, 3)
    # One consumer, two programs per SM, each in half: ptxas reported 98396 bytes at D 128
    # with 2 stages of 64 keys (the whole output tile staged); 3 stages would not fit twice.
    assert hp._stage_out(128, 64, 2, 1) and not hp._stage_out(128, 64, 3, 1)
    assert hp.SHARED_MEMORY == 232448


def test_each_call_describes_its_own_tensors(monkeypatch):
    rec = _Recorder(monkeypatch)
    args = _inputs()
    run = hp.bind_prefill_guarded(*args)
    other = _inputs()
    run(*other)
    gluon, fixup = rec.calls
    assert [gluon[2][i][1] for i in range(3)] == [t.data_ptr() for t in other[:3]]
    assert [fixup[2][i][1] for i in (0, 1, 2)] == [t.data_ptr() for t in other[:3]]
    assert gluon[2][6] == fixup[2][11], "the fixup reads the flags the kernel wrote"


def _addresses(args):
    """A recorded launch's arguments with each tensor and descriptor as its (base's) address."""
    return [a[1] if isinstance(a, tuple) and a[:1] in (("tensor",), ("desc",)) else a
            for a in args]


@pytest.mark.parametrize("page", [0, 16])
def test_pinned_launches_fire_from_addresses_read_once(monkeypatch, page):
    """Once raw_launch serves both pinned launches, a call reads each address once and fires
    both from them (``at``): the addresses the launchers' own path reads, in the same places,
    the kernel's flags the fixup's. Being captured, or no stream for a direct launch (another
    current device, a launch hook), takes the launchers' path."""
    from attn_ops.backends.triton import split_counters
    rec = _Recorder(monkeypatch, pinned=True)
    capturing, stream = [False], ["the stream"]
    monkeypatch.setattr(split_counters, "capturing", lambda: capturing[0])
    monkeypatch.setattr(launch_mod, "direct_stream", lambda device: stream[0])
    args = _inputs(page=page)
    run = hp.bind_prefill_guarded(*args)
    outs = [run(*args)]
    at = rec.calls[:]
    assert [c[0] for c in at] == ["gluon.at", "fixup.at"]
    assert {c[3]["stream"] for c in at} == {"the stream"}
    assert at[0][2][6] == at[1][2][11], "the fixup reads the flags the kernel wrote"
    for capturing[0], stream[0] in ((True, "the stream"), (False, None)):
        rec.calls.clear()
        outs.append(run(*args))
        assert [c[0] for c in rec.calls] == ["gluon", "fixup"]
        for (name, g, a, c), (_, g_at, a_at, c_at) in zip(rec.calls, at):
            addresses = _addresses(a)
            for i in (3, _FLAGS_AT[name]):  # the fresh output; the flags (fresh off the GPU)
                addresses[i] = a_at[i]
            c_at = {n: x for n, x in c_at.items() if n != "stream"}
            assert (g, addresses, c) == (g_at, a_at, c_at)
    assert len({o.data_ptr() for o in outs}) == 3, "a fresh output each call"
    # The flags the signature took on this stream stay its own when the shared scratch grows
    # for a larger call (the old buffer is held, its address still valid)
    capturing[0], stream[0] = False, "the stream"
    split_counters.scratch_on(1 << 20, args[0].device, "the stream")
    rec.calls.clear()
    run(*args)
    assert [c[0] for c in rec.calls] == ["gluon.at", "fixup.at"]
    assert rec.calls[0][2][6] == rec.calls[1][2][11] == at[0][2][6]


def test_calls_it_cannot_serve_directly_take_the_unbound_entry(monkeypatch):
    _Recorder(monkeypatch)
    taken = []
    monkeypatch.setattr(hp, "prefill_guarded", lambda *a: taken.append(a) or a[0])
    args = _inputs()
    q, k, v = args[:3]
    # Heads not packed (every other head of a wider tensor): TMA needs a copy, per signature.
    wide = torch.randn(q.shape[0], 16, 128).to(q.dtype)
    strided = (wide[:, ::2],) + args[1:]
    assert hp.bind_prefill_guarded(*strided) is hp.prefill_guarded
    # A base that is not 16-byte aligned: decided per call.
    run = hp.bind_prefill_guarded(*args)
    flat = torch.randn(q.numel() + 1).to(q.dtype)
    shifted = flat[1:].view(q.shape)
    assert shifted.stride() == q.stride() and shifted.data_ptr() % 16
    assert run(shifted, *args[1:]) is shifted and len(taken) == 1
    # The op's own arguments, as the dispatch memo passes them (those past the block table at
    # their defaults, which the route serves), under a dispatch mode (traced): the unbound
    # entry, with the signature's plan.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            return func(*a, **(kw or {}))
    assert run.routes_traced
    with Passthrough():
        assert run(*args, None, -1, 0.0, None, None, None, False) is q
    assert taken[-1][:11] == args + (None, None) and len(taken) == 2
    # Nothing to launch: the unbound entry's host-side result.
    empty = (q[:0],) + args[1:]
    assert hp.bind_prefill_guarded(*empty) is hp.prefill_guarded


def test_a_paged_cache_tma_cannot_read_takes_the_fa2_style_kernel(monkeypatch):
    """K and V pages interleaved in one buffer (a page of K, then one of V) are not one row
    matrix: the bound entry is not built, and the guarded entry hands the call to the
    isolating FA2-style kernel whole."""
    rec = _Recorder(monkeypatch)
    from attn_ops.backends.triton import prefill_kernel
    taken = []
    monkeypatch.setattr(prefill_kernel, "prefill", lambda *a, **kw: taken.append(a) or kw["out"])
    q, k, v, cq, ck, mq, mk, scale, causal, table = _inputs(page=16)
    pair = torch.stack((k, v), dim=1)  # [blocks, 2, page, Hkv, D]
    args = (q, pair[:, 0], pair[:, 1], cq, ck, mq, mk, scale, causal, table)
    assert "strides" in hp.cache_reason(pair[:, 0], pair[:, 1])
    assert hp.bind_prefill_guarded(*args) is hp.prefill_guarded
    hp.prefill_guarded(*args)
    assert len(taken) == 1 and not rec.calls


@pytest.mark.parametrize("min_q", [0, 4])
def test_only_the_split_routes_launch_numbers_items_over_the_longer_sequences(monkeypatch, min_q):
    # COMPACT (the item count and the per-item sequence search) is compiled in only where
    # min_q > 0 skips sequences: in dense prompts the search code cost 3-8%.
    rec = _Recorder(monkeypatch)
    args = _inputs()
    hp.bind_prefill_guarded(*args, min_q=min_q)(*args)
    hp.prefill_guarded(*args, min_q=min_q)
    gluon = [c for c in rec.calls if c[0] == "gluon"]
    assert len(gluon) == 2
    assert all(c[3]["COMPACT"] is (min_q > 0) for c in gluon)
    assert all(c[2][10 + 11] == min_q for c in gluon), "min_q: the 12th scalar"


def test_few_queries_take_the_packed_form_and_both_entries_plan_it_alike(monkeypatch):
    # 13, 0 and 7 queries at G = 4: every sequence in one chunk of 16 tokens, and 3 x 8 / 4 = 6
    # items against the CPU's nominal 4 SMs (common.device_sm_count): the rule packs.
    rec = _Recorder(monkeypatch)
    args = _inputs(lens=(13, 0, 7), page=16)
    assert hp.form(args[0], args[1], args[3], args[5], args[6], True, args[9]) == (1, 4)
    hp.prefill_guarded(*args)
    unbound = rec.calls[:]
    rec.calls.clear()
    hp.bind_prefill_guarded(*args)(*args)
    bound = rec.calls[:]
    for calls in (unbound, bound):
        for _, _, a, _ in calls:
            a[3] = ("out",) + a[3][2:]
    assert _flags_free(bound) == _flags_free(unbound)
    gluon, consts = bound[0][2], bound[0][3]
    # Q boxes of 16 rows (one per head of the pack), one consumer, the one-consumer flags
    assert gluon[0][4] == [16, 128] and consts["PACK"] == 4 and consts["CONSUMERS"] == 1
    assert _flags_free(bound)[0][2][6] == ("flags", math.prod(hp.flags_shape(13, 3, 8, 1)))
    assert bound[1][3]["BLOCK_M"] == 32 and bound[1][3]["FLAGS_PER_HALF"] == 2
    # 6 items on 4 "SMs": more than one per SM, so 64-key steps at two programs per SM
    assert (consts["BLOCK_N"], consts["STAGES"]) == (64, 2) and bound[0][1] == (8,)
    # a forced consumer count alone does not pack; min_q (the split route) never does
    call = (args[0], args[1], args[3], args[5], args[6], True, args[9])
    assert hp.form(*call, n_consumers=1) == (1, 1)
    assert hp.form(*call, min_q=2)[1] == 1


def test_the_packed_plan():
    from attn_ops.backends.triton.common import device_sm_count
    lens = [3] * 40
    q, k = torch.empty(sum(lens), 32, 128), torch.empty(sum(lens), 8, 128)
    cu = cu_seqlens(lens)
    sms = device_sm_count(q.device)
    grid, scalars, consts, shape, blocks = hp._plan(q, k, cu, cu, 3, 0.1, True, q.stride(),
                                                    None, 0, 1, 3, pack=4)
    assert shape == hp.flags_shape(3, 40, 32, 1) == (1, 41, 32, 4)
    assert blocks[0][0] == 16 and consts["PACK"] == 4 and consts["maxnreg"] == 128
    assert grid == (min(math.prod(shape[:3]), 2 * sms),)  # 320 items > 4 SMs: two per SM
    for bad in (dict(n_consumers=2), dict(min_q=1)):
        kwargs = dict(dict(n_consumers=1, min_q=0), **bad)
        with pytest.raises(ValueError, match="packed form"):
            hp._plan(q, k, cu, cu, 3, 0.1, True, q.stride(), None, kwargs["min_q"],
                     kwargs["n_consumers"], 3, pack=4)
