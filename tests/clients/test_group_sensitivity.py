"""clients.sensitivity: one group at a time, with and without compensation; deterministic; the
table round-trips through CSV and JSON."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from clients.activations import capture_activations
from clients.group_sensitivity import Order, SensitivityTable, sensitivity
from clients.manifest import build_manifest
from graphs.manifest import Manifest


class Net(nn.Module):
    """stem → a (1×1, planted: channels 4..7 are 2 × channels 0..3) → b (3×3, independent) →
    flatten → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        return self.fc(torch.flatten(x, 1))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        w, bias = net.a.weight, net.a.bias
        assert bias is not None
        w[:4] /= w[:4].abs().sum(dim=(1, 2, 3), keepdim=True)  # equal L1: l1 removes 0..3 first
        w[4:] = 2 * w[:4]  # relu(2z) = 2 relu(z): an exact linear combination
        bias[4:] = 2 * bias[:4]
    return net


def _data(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


@dataclass
class Setup:
    net: Net
    evaluate: Callable[[nn.Module], float]
    stats: dict[str, np.ndarray]
    manifest: Manifest
    names: dict[int, str]  # prunable group id -> first producer


def _setup() -> Setup:
    net = _net()
    held_out = _data(64, 1)
    with torch.no_grad():
        reference = net(held_out)

    def evaluate(model: nn.Module) -> float:  # negative output error on held-out data
        with torch.no_grad():
            return -float((model(held_out) - reference).pow(2).mean())

    stats = capture_activations(net, [_data(64, 0)], maps=False).stats()
    manifest = build_manifest(net, torch.zeros(1, 3, 4, 4))
    names = {g.id: g.producers[0] for g in manifest.groups if g.prunable}
    return Setup(net, evaluate, stats, manifest, names)


def test_planted_duplicates_are_insensitive_with_compensation() -> None:
    s = _setup()
    net = s.net
    assert set(s.names.values()) >= {"a", "b"}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.zeros(1, 3, 4, 4)
    table = sensitivity(net, x, s.evaluate, fractions=(0.5,), stats=s.stats, manifest=s.manifest)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # a copy is pruned
    assert table.baseline == 0.0
    by = {(r.name, r.compensated): r for r in table.rows}
    dup, indep = by["a", True], by["b", True]
    assert dup.removed == indep.removed == 4
    assert abs(dup.delta) < 1e-6 * abs(by["a", False].delta)  # the fold restores the output
    assert abs(indep.delta) > 100 * abs(dup.delta)  # independent channels cannot be replaced
    assert indep.delta < 0 and by["b", False].delta < 0


def test_deterministic_and_round_trips() -> None:
    s = _setup()
    x = torch.zeros(1, 3, 4, 4)
    kw = {"stats": s.stats, "manifest": s.manifest}
    orders: tuple[Order, ...] = ("l1", "random", "functional")
    for order in orders:
        one = sensitivity(s.net, x, s.evaluate, order=order, seed=3, **kw)  # type: ignore[arg-type]
        two = sensitivity(s.net, x, s.evaluate, order=order, seed=3, **kw)  # type: ignore[arg-type]
        assert one.to_json() == two.to_json() and one.to_csv() == two.to_csv()
        assert len(one.rows) == len(s.names) * 3 * 2
        assert SensitivityTable.from_json(one.to_json()) == one
        back = SensitivityTable.from_csv(one.to_csv())
        assert back.rows == one.rows and back.baseline == one.baseline
        header = one.to_csv().splitlines()[0].split(",")
        assert header[:4] == ["group", "name", "producers", "channels"]
        assert one.curve(one.rows[0].group, compensated=True)  # (fraction, delta) pairs
    # functional order finds the planted channels: removing half of 'a' costs nothing
    table = sensitivity(s.net, x, s.evaluate, order="functional", fractions=(0.5,), **kw)  # type: ignore[arg-type]
    assert {r.name: r for r in table.rows if r.compensated}["a"].delta > -1e-9


def test_bad_options_are_refused() -> None:
    s = _setup()
    net, evaluate, x = s.net, s.evaluate, torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="need stats"):
        sensitivity(net, x, evaluate, manifest=s.manifest)
    with pytest.raises(ValueError, match=r"fractions must be in \(0, 1\)"):
        sensitivity(net, x, evaluate, fractions=(0.0,), compensation=(False,))
    with pytest.raises(ValueError, match="order must be"):
        sensitivity(net, x, evaluate, order="fpgm", compensation=(False,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no statistics for"):
        sensitivity(net, x, evaluate, stats={}, manifest=s.manifest)
