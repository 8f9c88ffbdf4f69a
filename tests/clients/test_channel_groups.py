"""clients.channel_groups: what removing one layer's output channels touches."""

from __future__ import annotations

import torch
from torch import nn

from clients.channel_groups import all_group_structures, flatten_layout_problems
from clients.tracing import trace_model


class Residual(nn.Module):
    """Two convs whose outputs are added: one group with both as producers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.a(x) + self.b(x)))


class Flattened(nn.Module):
    """A conv flattened into a linear layer, optionally after a permute (channels last)."""

    def __init__(self, permute: bool) -> None:
        super().__init__()
        self.permute = permute
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        if self.permute:
            h = h.permute(0, 2, 3, 1)
        return self.fc(h.reshape(h.shape[0], -1))


def test_an_add_couples_its_producers_and_their_norm() -> None:
    torch.manual_seed(0)
    traced = trace_model(Residual(), torch.randn(1, 3, 8, 8))
    groups = {g.root: g for g in all_group_structures(traced)}
    assert set(groups) == {"a", "head"}  # b joined a's group: its channels are a's
    g = groups["a"]
    assert g.producers == ["a", "b"] and g.channels == 6 and not g.problems
    params = {(p.param, p.axis, p.per_channel) for p in g.params}
    expected = {("a.weight", 0), ("a.bias", 0), ("b.weight", 0), ("b.bias", 0)}
    expected |= {("bn.weight", 0), ("bn.bias", 0), ("head.weight", 1)}
    assert params == {(name, axis, 1) for name, axis in expected}


def test_a_flatten_gives_whole_blocks_unless_a_permute_interleaves_them() -> None:
    x = torch.randn(1, 2, 4, 4)
    for permute in (False, True):
        torch.manual_seed(0)
        model = Flattened(permute).eval()
        traced = trace_model(model, x)
        (group,) = [g for g in all_group_structures(traced) if g.root == "conv"]
        assert ("fc.weight", 1, 16) in {(p.param, p.axis, p.per_channel) for p in group.params}
        problems = flatten_layout_problems(dict(model.named_modules()), x, group)
        assert bool(problems) == permute
        assert all("interleaved" in p for p in problems)
