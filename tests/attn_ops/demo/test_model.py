"""DemoLlama: the paged serving path (prefill, chunked prefill, padded decode) equals forward()."""

import torch

from tests.support.helpers import assert_close


@torch.inference_mode()
def test_paged_forward_matches_full_forward(model):
    """Packed prefill (odd lengths), a prefix-cached second chunk, padded decode steps."""
    ids = torch.randint(0, model.cfg.vocab_size, (2, 23))
    full = model(ids)                                             # [2, 23, vocab]
    cache = model.new_cache(num_blocks=16, block_size=4, max_seq_len=32)
    batch = cache.prepare_prefill({"a": 13, "b": 1})
    out = model.prefill(torch.cat([ids[0, :13], ids[1, :1]]), cache, batch)
    assert_close(out, torch.stack([full[0, 12], full[1, 0]]), 1e-4, 1e-4, "prefill")
    batch = cache.prepare_prefill({"b": 6})                       # continues b: 1 cached + 6
    assert_close(model.prefill(ids[1, 1:7], cache, batch)[0], full[1, 6], 1e-4, 1e-4, "chunk")
    for pos_a, pos_b in [(13, 7), (14, 8), (15, 9)]:
        step = cache.prepare_decode(["b", "a"], pad_to=5)         # rows 2..4 are padding
        tokens = torch.tensor([ids[1, pos_b], ids[0, pos_a], 0, 0, 0])
        out = model.decode(tokens, cache, step)
        assert not torch.isnan(out).any()
        assert_close(out[:2], torch.stack([full[1, pos_b], full[0, pos_a]]), 1e-4, 1e-4,
                     f"decode at {pos_a}")
