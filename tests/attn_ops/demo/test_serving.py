"""Continuous batching: admission, padded decode, the check against eager, progress."""

import io

import pytest
import torch
from tqdm import tqdm

from attn_ops.demo.serving import Request, check_against_eager, serve


def _requests(model, lens, new):
    gen = torch.Generator().manual_seed(7)
    vocab = model.cfg.vocab_size
    return [Request(f"r{i}", torch.randint(0, vocab, (n,), generator=gen).tolist(), m)
            for i, (n, m) in enumerate(zip(lens, new))]


@torch.inference_mode()
def test_continuous_batching_serves_eager_tokens(model):
    reqs = _requests(model, [5, 11, 3, 8, 13], [6, 2, 5, 1, 4])
    cache = model.new_cache(num_blocks=8, block_size=4, max_seq_len=24)
    stats = serve(model, reqs, cache, max_batch=3)
    assert [len(r.output) for r in reqs] == [6, 2, 5, 1, 4]
    assert stats.generated == 18 and stats.max_running == 3
    assert stats.decode_padded_rows > 0                    # the tail ran with padded rows
    assert len({r.finished_at for r in reqs}) > 2          # finished at different steps
    assert max(r.admitted_at for r in reqs) > 0            # later requests joined mid-way
    assert cache.num_free_blocks == 8                      # every block came back
    check = check_against_eager(model, reqs, logit_tol=1e-3)
    assert check.ok and check.tokens_checked == 18 and check.max_logit_err < 1e-3


@torch.inference_mode()
def test_admission_waits_for_cache_blocks(model):
    """Blocks needed to the end: 3 + 3 + 2 + 2 + 4 of 7; the third request must wait."""
    reqs = _requests(model, [5, 11, 3, 8, 13], [6, 2, 5, 1, 4])
    cache = model.new_cache(num_blocks=7, block_size=4, max_seq_len=24)
    stats = serve(model, reqs, cache, max_batch=4)
    assert stats.max_running == 2
    assert reqs[2].admitted_at > 0 and cache.num_free_blocks == 7
    assert check_against_eager(model, reqs, logit_tol=1e-3).ok


@torch.inference_mode()
def test_check_against_eager_catches_a_wrong_token(model):
    reqs = _requests(model, [6], [4])
    serve(model, reqs, model.new_cache(4, 4, 16), max_batch=2)
    reqs[0].output[-1] = (reqs[0].output[-1] + 1) % model.cfg.vocab_size  # never fed back
    assert check_against_eager(model, reqs, logit_tol=1e-3).mismatches == 1


def test_serve_rejects_a_request_larger_than_the_cache(model):
    with pytest.raises(ValueError, match="needs 5 blocks"):
        serve(model, _requests(model, [17], [2]), model.new_cache(4, 4, 32), max_batch=2)


@torch.inference_mode()
def test_serve_advances_the_progress_bar_per_generated_token(model):
    reqs = _requests(model, [4, 9], [3, 2])
    bar = tqdm(total=5, file=io.StringIO())
    stats = serve(model, reqs, model.new_cache(6, 4, 16), max_batch=2, progress=bar)
    assert bar.n == stats.generated == 5
    bar.close()
