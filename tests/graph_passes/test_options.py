"""SubstitutionOptions: the attn_ops.* keys of torch.compile options, and bad values."""

import pytest

from graph_passes.options import SubstitutionOptions, split_options


def test_split_options():
    ours, rest = split_options({"attn_ops.handwritten": False, "max_autotune": True})
    assert ours == SubstitutionOptions(handwritten=False) and rest == {"max_autotune": True}
    with pytest.raises(ValueError, match="attn_ops.nope"):
        split_options({"attn_ops.nope": 1})
    with pytest.raises(ValueError, match="attn_backend"):
        SubstitutionOptions(attn_backend="cuda-magic")
    with pytest.raises(ValueError, match="unknown substitution option"):
        SubstitutionOptions.coerce({"max_autotune": True})
    assert SubstitutionOptions.coerce({"sdpa": False}) == SubstitutionOptions(sdpa=False)
