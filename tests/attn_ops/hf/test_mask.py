"""The "attn_ops" mask builder: what it returns, and that the ops reading its key ranges attend
exactly where transformers' own boolean mask (sdpa_mask) lets them."""

import pytest
import torch

from tests.support.helpers import assert_close

transformers = pytest.importorskip("transformers")

from transformers.masking_utils import (and_masks, causal_mask_function,  # noqa: E402
                                        sdpa_mask, sliding_window_causal_mask_function)

import attn_ops.hf  # noqa: E402
from attn_ops.hf import OpsMask, attn_ops_mask  # noqa: E402


class Config:
    sliding_window = 3
    attention_chunk_size = None


class Module(torch.nn.Module):
    is_causal = True


def _args(b, sq, past, s_max, pad, window, static):
    """Mask-interface arguments: ``past`` tokens cached, ``sq`` new ones; a static cache holds
    ``s_max`` slots and gives q_offset as a tensor."""
    kv_length = s_max if static else past + sq
    return dict(batch_size=b, q_length=sq, kv_length=kv_length,
                q_offset=torch.tensor(past) if static else past, kv_offset=0,
                mask_function=causal_mask_function if window is None else
                sliding_window_causal_mask_function(window),
                attention_mask=pad, local_size=window, config=Config())


def _padding(b, length, kind, gen):
    pad = torch.ones(b, length, dtype=torch.bool)
    for row in range(b):
        n = int(torch.randint(0, length // 2, (1,), generator=gen))
        if kind == "left":
            pad[row, :n] = False
        elif kind == "right":
            pad[row, length - n:] = False
        elif n:  # holes anywhere, the last token kept (it is being generated)
            pad[row, torch.randperm(length - 1, generator=gen)[:n]] = False
    return pad


# A window over several queries with holes needs one run of keys per row: not taken (the
# raising test below), so that combination is left out here.
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("sq,past,kind,window", [
    (sq, past, kind, window) for sq, past in ((1, 9), (5, 0), (4, 6))
    for kind, window in (("left", None), ("right", None), ("holes", None), ("left", 3),
                         ("right", 3), ("holes", 3))
    if not (kind == "holes" and window is not None and sq > 1)])
def test_ops_over_the_key_ranges_match_sdpa_over_transformers_mask(static, sq, past, kind,
                                                                   window):
    gen = torch.Generator().manual_seed(sq * 31 + past)
    b, h, hkv, d, s_max = 3, 4, 2, 16, 16
    pad = _padding(b, past + sq, kind, gen)
    args = _args(b, sq, past, s_max, pad, window, static)
    mask = attn_ops_mask(**args)
    assert isinstance(mask, OpsMask) and mask.padded
    expected_mask = sdpa_mask(**dict(args, allow_is_causal_skip=False))  # [B, 1, Sq, Sk]
    sk = args["kv_length"]
    q = torch.randn(b, h, sq, d, generator=gen) * 3
    k, v = torch.randn(b, hkv, sk, d, generator=gen) * 3, torch.randn(b, hkv, sk, d, generator=gen)
    k[:, :, past + sq:] = float("nan")  # unwritten static slots: never read
    out, _ = attn_ops.hf.attn_ops_attention_forward(Module(), q, k, v, mask,
                                                    sliding_window=window)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.nan_to_num(), v, attn_mask=expected_mask, enable_gqa=True).transpose(1, 2)
    real = pad[:, past:past + sq]
    if sq == 1:  # decode: a padding query reads the real keys, as in transformers' mask
        real = expected_mask.flatten(1).any(1, keepdim=True)
    else:  # prefill: padding queries are unpadded away (zeros), as in transformers' flash path
        assert torch.all(out[~real] == 0)
    assert_close(out[real], ref[real], 1e-5, 1e-5, "real queries")


def test_a_window_over_keys_with_holes_raises_instead_of_a_wrong_answer():
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[0, 3] = False  # a hole: compacted positions are no longer token distances
    args = _args(2, 4, 5, 16, pad, 3, False)
    mask = attn_ops_mask(**args)
    q, k = torch.randn(2, 4, 4, 16), torch.randn(2, 2, 9, 16)
    with pytest.raises(RuntimeError, match="one run per row"):
        attn_ops.hf.attn_ops_attention_forward(Module(), q, k, k, mask, sliding_window=3)
    pad[0, :4] = False  # left padding: one run
    mask = attn_ops_mask(**dict(args, attention_mask=pad))
    attn_ops.hf.attn_ops_attention_forward(Module(), q, k, k, mask, sliding_window=3)


def test_what_the_builder_returns():
    cfg = Config()
    plain = dict(batch_size=2, q_length=4, kv_length=9, q_offset=5, kv_offset=0, config=cfg)
    assert attn_ops_mask(**plain) is None  # keys end at the last query, no padding
    static = attn_ops_mask(**dict(plain, kv_length=16, q_offset=torch.tensor(5)))
    assert isinstance(static, OpsMask) and not static.padded
    assert static.seqlens_k.tolist() == [9, 9]
    assert static.cu_seqlens_k.tolist() == [0, 9, 18]
    past_the_end = attn_ops_mask(**dict(plain, q_length=1, kv_length=16,
                                        q_offset=torch.tensor(20)))
    assert past_the_end.seqlens_k.tolist() == [16, 16]  # clamped to the cache
    chunked = dict(plain, mask_function=and_masks(causal_mask_function, causal_mask_function),
                   local_size=4)
    assert isinstance(attn_ops_mask(**chunked), torch.Tensor)  # not a pattern the ops take
    custom = attn_ops_mask(**dict(plain, use_vmap=True))
    assert isinstance(custom, torch.Tensor) and custom.dtype == torch.bool
    asked = attn_ops_mask(**dict(plain, allow_is_causal_skip=False))
    assert isinstance(asked, torch.Tensor)  # a caller that combines masks gets a tensor
    padded = attn_ops_mask(**dict(plain, attention_mask=torch.ones(2, 9, dtype=torch.bool)))
    assert padded is attn_ops_mask(**dict(plain, attention_mask=padded))  # passed through
    assert padded.dense().shape == (2, 1, 4, 9)
