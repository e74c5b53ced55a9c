"""graph_passes.enable / enabled: plain torch.compile substitutes, and undo restores exactly."""

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

import attn_ops  # noqa: F401  (registers torch.ops.attn.*)
import graph_passes
from attn_ops import registry
from tests.support.attention_models import SdpaAttention
from tests.support.helpers import TOLERANCES, assert_close

pytestmark = pytest.mark.usefixtures("fresh_compile")


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """CPU "auto" does not substitute (pure-torch backends are slower): choose the reference."""
    monkeypatch.setenv("ATTN_OPS_BACKEND", "reference")


class _UserPass(CustomGraphPass):
    """A user's pre-grad pass: counts its calls and notes whether the graph it gets still holds
    the model's SDPA (ours has not run yet)."""

    def __init__(self):
        self.calls = 0
        self.saw_sdpa = []

    def __call__(self, graph):
        self.calls += 1
        self.saw_sdpa.append(any("scaled_dot_product_attention" in str(n.target)
                                 for n in graph.nodes))

    def uuid(self):
        return "user-pass"


def test_opt_in_substitutes_in_plain_compile_and_undoes_exactly(prefill_calls):
    cfg = torch._inductor.config
    user = _UserPass()
    with cfg.patch(pre_grad_custom_pass=user):
        before = (cfg.pre_grad_custom_pass, cfg.joint_custom_pre_pass)
        handle = graph_passes.enable()
        assert graph_passes.is_enabled()
        model, x = SdpaAttention().eval(), torch.randn(2, 7, 64)
        with torch.no_grad():
            out, ref = torch.compile(model)(x), model(x)
        assert counters["graph_passes"]["sdpa_to_prefill"] == 1 and len(prefill_calls) == 1
        assert_close(out, ref, *TOLERANCES[torch.float32])
        assert user.calls == 1 and user.saw_sdpa == [True], \
            "the user's own pre-grad pass still runs, first"
        inner = graph_passes.enable(sdpa=False)
        with pytest.raises(RuntimeError, match="cannot undo"):
            handle.undo()
        inner.undo()
        handle.undo()
        assert (cfg.pre_grad_custom_pass, cfg.joint_custom_pre_pass) == before
        assert cfg.pre_grad_custom_pass is user and not graph_passes.is_enabled()
    with graph_passes.enabled(attn_backend="reference"):
        assert graph_passes.is_enabled() and registry.current_choice() == "reference"
    assert not graph_passes.is_enabled()
