"""The rules that pick the Gluon Hopper prefill's form (hopper_prefill_forms.py), off the GPU:
the packed form for few queries per sequence, and its key step."""

from attn_ops.backends.triton import hopper_prefill_forms as forms


def test_pack_is_four_heads_or_two_of_a_kv_head():
    assert [forms.pack_of(h, 8) for h in (8, 16, 24, 32, 64, 128)] == [1, 2, 1, 4, 4, 4]
    assert forms.pack_of(12, 4) == 1 and forms.pack_of(28, 4) == 1  # G = 3, 7


def test_packing_takes_few_queries_with_about_an_item_per_sm():
    sms = 132
    # B 16 at 32/8 heads: 128 items of 16 tokens x 4 heads (>= 0.9 per SM)
    assert forms.packing(32, 8, 8, 16, sms) == 4
    assert forms.packing(32, 8, 16, 16, sms) == 4 and forms.packing(32, 8, 17, 16, sms) == 1
    assert forms.packing(32, 8, 8, 15, sms) == 4  # 120 items
    assert forms.packing(32, 8, 8, 14, sms) == 1  # 112: fewer than 0.9 per SM
    # 16 rows or fewer (4 queries at G = 4): the unified kernel's 16-row tiles serve them
    assert forms.packing(32, 8, 4, 64, sms) == 1 and forms.packing(32, 8, 5, 64, sms) == 4
    assert forms.packing(16, 8, 32, 64, sms) == 2 and forms.packing(16, 8, 33, 64, sms) == 1
    assert forms.packing(8, 8, 16, 1024, sms) == 1  # no group to pack
    assert forms.packing(64, 8, 16, 8, sms) == 4  # G 8: two items per KV head
    assert forms.packing(64, 8, 2, 64, sms) == 1 and forms.packing(64, 8, 3, 64, sms) == 4


def test_the_packed_key_step_follows_the_items_per_sm():
    # one program per SM with 128-key steps where the items fit, else two with 64-key steps
    assert forms.packed_config(128, 132) == (128, 2, 1)
    assert forms.packed_config(133, 132) == (64, 2, 2)
