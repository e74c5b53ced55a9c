"""compile_and_check reads the substitution from the generated code: it must see a miss."""

import torch

from attn_ops.demo.compile_check import compile_and_check


class CausalSdpa(torch.nn.Module):
    """Nothing but one causal SDPA call: the cheapest model to compile."""

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@torch.inference_mode()
def test_compile_check_fails_without_substitution():
    """With the SDPA pass off, the compiled code keeps SDPA: the check must say so."""
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    result = compile_and_check(CausalSdpa(), (q, k, v), expected=1, tol=1e-5,
                               options={"attn_ops.sdpa": False})
    assert result["prefill_calls"] == 0 and result["sdpa_calls"] == 1
    assert result["max_err"] <= 1e-5 and not result["ok"]
