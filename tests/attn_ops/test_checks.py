"""Bad input: clear errors naming the argument, in eager mode and at trace time; data checks."""

import pytest
import torch

import attn_ops  # noqa: F401
from tests.support.helpers import cu_seqlens, random_paged

D = 32


def _prefill_args(**over):
    args = dict(q=torch.randn(6, 4, D), k=torch.randn(6, 2, D), v=torch.randn(6, 2, D),
                cu_seqlens_q=cu_seqlens([2, 4]), cu_seqlens_k=cu_seqlens([2, 4]), max_seqlen_q=4,
                max_seqlen_k=4, scale=0.1, causal=True, block_table=None, window_left=-1,
                softcap=0.0)
    args.update(over)
    return list(args.values())


def _decode_args(**over):
    pb = random_paged([3, 5], 2, D, 4, torch.float32)
    args = dict(q=torch.randn(2, 4, D), k_cache=pb.k_cache, v_cache=pb.v_cache,
                seqlens_k=torch.tensor([3, 5], dtype=torch.int32), block_table=pb.block_table,
                scale=0.1, window_left=-1, softcap=0.0)
    args.update(over)
    return list(args.values())


def _store_args(**over):
    args = dict(key=torch.randn(3, 2, D), value=torch.randn(3, 2, D),
                k_cache=torch.randn(4, 4, 2, D), v_cache=torch.randn(4, 4, 2, D),
                slot_mapping=torch.tensor([0, 5, -1]))
    args.update(over)
    return list(args.values())


PREFILL_BAD = [
    (dict(q=torch.randn(6, 4)), r"q: expected a 3-D tensor of shape \[Tq, H, D\], got shape \[6, 4\]"),
    (dict(q=torch.randn(6, 3, D)), r"q has 3 heads and k has 2.*H % Hkv == 0"),
    (dict(q=torch.randn(6, 4, 20), k=torch.randn(6, 2, 20), v=torch.randn(6, 2, 20)),
     r"q: unsupported head dim 20"),
    (dict(q=torch.randn(6, 4, 512), k=torch.randn(6, 2, 512), v=torch.randn(6, 2, 512)),
     r"q: unsupported head dim 512"),
    (dict(k=torch.randn(6, 2, 64), v=torch.randn(6, 2, 64)), r"k: expected head dim 32 \(that of q\)"),
    (dict(v=torch.randn(5, 2, D)), r"v: expected the shape of k \[6, 2, 32\]"),
    (dict(k=torch.randn(6, 2, D, dtype=torch.float16)), r"k: expected dtype torch.float32"),
    (dict(q=torch.randn(6, 4, D).int()), r"q: expected a floating dtype"),
    (dict(q=torch.randn(6, D, 4).transpose(1, 2)), r"q: the last dim must be contiguous"),
    (dict(cu_seqlens_q=cu_seqlens([2, 4]).long()), r"cu_seqlens_q: expected int32"),
    (dict(cu_seqlens_k=cu_seqlens([6])), r"cu_seqlens_k: expected shape \[3\]"),
    (dict(scale=0.0), r"scale: expected a positive float"),
    (dict(window_left=-3), r"window_left: expected -1"),
    (dict(softcap=-1.0), r"softcap: expected 0.0"),
    (dict(block_table=torch.zeros(2, 3, dtype=torch.int32)),
     r"k_cache: expected a 4-D tensor of shape \[num_blocks, block_size, Hkv, D\]"),
    (dict(k=torch.randn(3, 4, 2, D), v=torch.randn(3, 4, 2, D),
          block_table=torch.zeros(3, 3, dtype=torch.int32)),
     r"block_table: expected shape \[2, max_blocks_per_seq\]"),
    (dict(v=torch.randn(6, 2, D, dtype=torch.float64)),
     r"v: expected dtype torch.float32 \(that of k\), got torch.float64"),
    (dict(k=torch.randn(6, 2, D, device="meta")),
     r"k: expected a tensor on cpu \(the device of q\), got one on meta"),
]


@pytest.mark.parametrize("over,msg", PREFILL_BAD)
def test_prefill_bad_input_eager(over, msg):
    with pytest.raises(ValueError, match=msg):
        torch.ops.attn.prefill(*_prefill_args(**over))


@pytest.mark.parametrize("over,msg", PREFILL_BAD[:6])
def test_prefill_bad_input_at_trace_time(over, msg):
    torch._dynamo.reset()
    fn = torch.compile(torch.ops.attn.prefill.default, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=msg):
        fn(*_prefill_args(**over))


DECODE_BAD = [
    (dict(q=torch.randn(2, 4, D, 1)), r"q: expected a 3-D tensor of shape \[B, H, D\]"),
    (dict(seqlens_k=torch.tensor([3], dtype=torch.int32)), r"seqlens_k: expected shape \[2\]"),
    (dict(seqlens_k=torch.tensor([3, 5])), r"seqlens_k: expected int32"),
    (dict(block_table=torch.zeros(2, dtype=torch.int32)),
     r"block_table: expected a 2-D tensor of shape \[B, max_blocks_per_seq\]"),
    (dict(block_table=torch.zeros(2, 3, dtype=torch.float32)), r"block_table: expected an integer"),
    (dict(q=torch.randn(2, 3, D)), r"q has 3 heads and k_cache has 2"),
    (dict(v_cache=torch.randn(9, 4, 2, D)), r"v_cache: expected the shape of k_cache"),
    (dict(k_cache=torch.randn(9, 4, D, 2).transpose(2, 3), v_cache=torch.randn(9, 4, 2, D)),
     r"k_cache: expected a \[num_blocks, block_size, Hkv, D\] view whose last dim \(D\) is "
     r"contiguous"),
    (dict(k_cache=torch.randn(9, 4, 2, 64), v_cache=torch.randn(9, 4, 2, 64)),
     r"k_cache: expected head dim 32 \(that of q\), got shape \[9, 4, 2, 64\]"),
]


@pytest.mark.parametrize("over,msg", DECODE_BAD)
def test_decode_bad_input_eager(over, msg):
    with pytest.raises(ValueError, match=msg):
        torch.ops.attn.decode(*_decode_args(**over))


@pytest.mark.parametrize("over,msg", DECODE_BAD[:3])
def test_decode_bad_input_at_trace_time(over, msg):
    torch._dynamo.reset()
    fn = torch.compile(torch.ops.attn.decode.default, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=msg):
        fn(*_decode_args(**over))


STORE_BAD = [
    (dict(key=torch.randn(3, 2, 64)), r"key: expected shape \[T, 2, 32\]"),
    (dict(value=torch.randn(2, 2, D)), r"value: expected shape \[3, 2, 32\] \(T of key\)"),
    (dict(slot_mapping=torch.tensor([0, 1])), r"slot_mapping: expected shape \[3\]"),
    (dict(slot_mapping=torch.tensor([0.0, 1.0, 2.0])), r"slot_mapping: expected an integer"),
    (dict(key=torch.randn(3, 2, D).half()), r"key: expected dtype torch.float32"),
    (dict(k_cache=torch.randn(4, 4, 2, D).half()), r"v_cache: expected dtype torch.float16"),
]


@pytest.mark.parametrize("over,msg", STORE_BAD)
def test_store_bad_input_eager(over, msg):
    with pytest.raises(ValueError, match=msg):
        torch.ops.attn.store_kvcache(*_store_args(**over))


@pytest.mark.parametrize("over,msg", STORE_BAD[:3])
def test_store_bad_input_at_trace_time(over, msg):
    torch._dynamo.reset()
    fn = torch.compile(torch.ops.attn.store_kvcache.default, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=msg):
        fn(*_store_args(**over))


# ---- data checks (ATTN_OPS_CHECK=1 is set by conftest) ----------------------------------------

def test_store_slot_out_of_range_raises_before_writing():
    args = _store_args(slot_mapping=torch.tensor([0, 16, 3]))  # 4 blocks * 4 = 16 slots
    before = args[2].clone()
    with pytest.raises(ValueError, match=r"slot_mapping\[1\] = 16 is out of range.*\[0, 16\)"):
        torch.ops.attn.store_kvcache(*args)
    assert torch.equal(args[2], before)
    with pytest.raises(ValueError, match=r"slot_mapping\[0\] = -2"):
        torch.ops.attn.store_kvcache(*_store_args(slot_mapping=torch.tensor([-2, 1, 3])))


@pytest.mark.parametrize("over,msg", [
    (dict(cu_seqlens_q=torch.tensor([0, 4, 2], dtype=torch.int32)), r"not non-decreasing"),
    (dict(cu_seqlens_q=torch.tensor([1, 2, 6], dtype=torch.int32)), r"cu_seqlens_q\[0\] = 1"),
    (dict(cu_seqlens_k=torch.tensor([0, 2, 7], dtype=torch.int32)), r"exceeds the 6 rows"),
    (dict(max_seqlen_q=3), r"more than max_seqlen = 3"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32)), r"3 queries but only 2 keys"),
])
def test_prefill_data_checks(over, msg):
    with pytest.raises(ValueError, match=msg):
        torch.ops.attn.prefill(*_prefill_args(**over))


def test_paged_data_checks():
    pb = random_paged([3, 5], 2, D, 4, torch.float32)
    table = pb.block_table.clone()
    table[1, 1] = 99  # sequence 1 needs 2 blocks: its second id is out of range
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 99 is not a block id"):
        torch.ops.attn.decode(*_decode_args(k_cache=pb.k_cache, v_cache=pb.v_cache,
                                            block_table=table))
    with pytest.raises(ValueError, match=r"seqlens_k\[0\] = 9 is outside \[0, 8\]"):
        torch.ops.attn.decode(*_decode_args(seqlens_k=torch.tensor([9, 5], dtype=torch.int32)))


def test_padding_is_always_valid():
    """slot -1 and seqlens 0 pass the data checks and produce no writes / zero rows."""
    args = _store_args(slot_mapping=torch.tensor([-1, -1, -1]))
    before = args[2].clone()
    torch.ops.attn.store_kvcache(*args)
    assert torch.equal(args[2], before)
    out = torch.ops.attn.decode(*_decode_args(seqlens_k=torch.tensor([0, 0], dtype=torch.int32)))
    assert torch.equal(out, torch.zeros_like(out))
