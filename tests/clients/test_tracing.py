"""clients.tracing: one traced forward pass (calls, MACs, roles) that changes nothing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from clients.flops import count_layer_macs
from clients.tracing import as_input_tuple, find_roles, keep_training_flags, trace_model
from tests.clients import models


class TwoHeads(nn.Module):
    """Input → flatten-free ReLU → stem conv → two linear heads (two outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_a = nn.Linear(8, 4)
        self.head_b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.pool(self.body(self.stem(self.act(x)))).flatten(1)
        return self.head_a(h), self.head_b(h)


def test_roles_are_the_layers_that_read_the_input_and_write_the_outputs() -> None:
    traced = trace_model(TwoHeads(), torch.randn(1, 3, 8, 8))
    assert find_roles(traced) == (["stem"], ["head_a", "head_b"])
    assert {c.name for c in traced.calls} >= {"stem", "body", "head_a", "head_b", "pool"}


@pytest.mark.parametrize("factory", [models.digit_cnn, models.vgg16_bn])
def test_call_macs_per_sample_agree_with_the_hook_count(factory: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(2, 1, 28, 28) if factory is models.digit_cnn else torch.randn(2, 3, 32, 32)
    traced = trace_model(model, x)
    counted = count_layer_macs(model, as_input_tuple(x))
    modules = dict(model.named_modules())
    ours: dict[str, float] = {}
    for call in traced.calls:
        if isinstance(modules[call.name], (nn.Conv2d, nn.Linear)):
            ours[call.name] = ours.get(call.name, 0.0) + call.macs
    assert set(ours) == set(counted)
    for name, macs in ours.items():
        assert macs == pytest.approx(counted[name], rel=1e-9), name


def test_tracing_changes_no_weight_statistic_or_training_flag() -> None:
    torch.manual_seed(1)
    model = models.digit_cnn().train()
    model.conv_layers[0].eval()  # a mixed state must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    trace_model(model, torch.randn(4, 1, 28, 28))
    assert [m.training for m in model.modules()] == flags
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_flags_come_back_after_an_error() -> None:
    model = models.digit_cnn().train()
    with pytest.raises(RuntimeError, match="boom"), keep_training_flags(model):
        model.eval()
        raise RuntimeError("boom")
    assert all(m.training for m in model.modules())
