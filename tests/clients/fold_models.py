"""Models and a plan builder for the compensation tests (test_fold, test_fold_plans)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from clients import apply_plan, build_manifest, capture_activations
from clients.fold import least_squares_folds
from graphs.fold import Compensation, ConsumerFold, encode_sidecar, fold_keys, sidecar_sha256
from graphs.manifest import Manifest
from graphs.plan import Constraints, GroupPlan, PruningPlan, Target

Removal = Mapping[str, list[int]]  # first producer of a group -> ORIGINAL indices to remove


def make_plan(
    model: nn.Module,
    manifest: Manifest,
    removal: Removal,
    stats: Mapping[str, np.ndarray] | None,
) -> tuple[PruningPlan, bytes]:
    """A plan removing ``removal``, with least-squares folds from ``stats`` (None: no
    compensation), and its sidecar bytes."""
    shapes = {n: list(s) for n, s in manifest.param_shapes.items()}
    groups, folds, arrays = [], [], {}
    for g in manifest.groups:
        remove = sorted(removal.get(g.producers[0], []))
        if not remove:
            continue
        for pa in g.params:
            shapes[pa.param][pa.axis] -= len(remove) * pa.per_channel
        groups.append(
            GroupPlan(
                id=g.id,
                name=g.producers[0],
                producers=g.producers,
                channels_before=g.channels,
                channels_after=g.channels - len(remove),
                remove=remove,
                redundancy=None,
                rationale="test",
            )
        )
        for f in least_squares_folds(model, g, remove, stats) if stats is not None else []:
            matrix, shift = fold_keys(g.id, f.consumer)
            arrays[matrix], arrays[shift] = f.matrix, f.shift
            bias = f"{f.consumer}.bias"
            folds.append(
                ConsumerFold(
                    group=g.id,
                    consumer=f.consumer,
                    weight=f"{f.consumer}.weight",
                    bias=bias if bias in manifest.param_shapes else None,
                    per_channel=f.per_channel,
                    kept=f.kept,
                    removed=f.removed,
                    matrix=matrix,
                    shift=shift,
                    predicted_error=0.0,
                    kind="least_squares",
                )
            )
    sidecar = encode_sidecar(arrays)
    comp = None
    if stats is not None:
        comp = Compensation(
            sidecar_sha256=sidecar_sha256(sidecar), sidecar_bytes=len(sidecar), folds=folds
        )
    n_after = sum(int(np.prod(s)) for s in shapes.values())
    plan = PruningPlan(
        checkpoint_sha256=None, method="l1", target=Target(flops=0.1),
        constraints=Constraints(), seed=0, parameters={}, coupling="manifest", groups=groups,
        expected_shapes=shapes, params_before=manifest.params_total, params_after=n_after,
        flops_before=None, flops_after=None, achieved={}, rule="test", compensation=comp,
    )  # fmt: skip
    return plan, sidecar


class Residual(nn.Module):
    """stem → (p1 + p2) → BN: a coupled group read by two 1×1 consumers c1 (no bias, then BN)
    and c2, added → ReLU → pool → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.p1, self.p2 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.c1, self.c2 = nn.Conv2d(8, 6, 1, bias=False), nn.Conv2d(8, 6, 1)
        self.bn_c1 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        s = self.bn(self.p1(h) + self.p2(h))
        y = torch.relu(self.bn_c1(self.c1(s)) + self.c2(s))
        return self.fc(y.mean(dim=(2, 3)))


class Chain(nn.Module):
    """stem → a (3×3) → ReLU → b (3×3 stride 2, consumer of a) → ReLU → flatten (8×6×6) → fc1
    (linear after flatten, consumer of b) → ReLU → fc2. Inputs are 12×12."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(torch.relu(self.stem(x))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(torch.relu(self.b(h)), 1))))


def randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean = torch.randn(m.num_features, generator=g)
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g)


def residual(planted: bool) -> Residual:
    torch.manual_seed(0)
    net = Residual().eval()
    randomize_bn(net)
    if planted:  # channels 5..7 = B · channels 0..4 + offset, in p1 + p2 (BN keeps it affine)
        B = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            for p in (net.p1, net.p2):
                assert p.bias is not None
                p.weight[5:] = torch.einsum("rk,kiyx->riyx", B, p.weight[:5])
                p.bias[5:] = B @ p.bias[:5] + 0.3
    return net


def chain(planted: bool) -> Chain:
    torch.manual_seed(0)
    net = Chain().eval()
    if planted:  # relu(2z) = 2 relu(z): channels 6, 7 of a and b are 2 × channels 0, 1
        with torch.no_grad():
            for conv in (net.a, net.b):
                assert conv.bias is not None
                conv.weight[6:] = 2 * conv.weight[:2]
                conv.bias[6:] = 2 * conv.bias[:2]
    return net


def data(n: int, seed: int, size: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def outputs(
    make: Callable[[bool], nn.Module], planted: bool, removal: Removal, compensate: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(original outputs, pruned outputs) on held-out data."""
    net = make(planted)
    size = 12 if isinstance(net, Chain) else 4
    x = torch.zeros(1, 3, size, size)
    held_out = data(32, 7, size)
    with torch.no_grad():
        before = net(held_out)
    calibration = [data(64, 0, size)]
    stats = capture_activations(net, calibration, maps=False).stats() if compensate else None
    plan, sidecar = make_plan(net, build_manifest(net, x), removal, stats)
    apply_plan(net, plan, x, compensation=sidecar if compensate else None)
    with torch.no_grad():
        return before, net(held_out)


def error(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((after - before).pow(2).mean() / before.pow(2).mean())
