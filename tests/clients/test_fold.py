"""apply_plan with compensation (issue 14 contract B): folds validated before any weight changes,
exact where removed channels are linear combinations of kept ones, better than no fold
elsewhere; BN recalibration."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clients import PlanMismatchError, apply_plan, build_manifest, capture_activations
from clients.fold import Fold, fold_module, least_squares_folds, recalibrate_batchnorm
from graphs.compensated import save_plan
from graphs.fold import (
    SIDECAR_SUFFIX,
    Compensation,
    ConsumerFold,
    encode_sidecar,
    fold_keys,
    sidecar_sha256,
)
from graphs.manifest import Manifest
from graphs.plan import Constraints, GroupPlan, PruningPlan, Target
from graphs.planner import plan_layers
from service.ingest import read_checkpoint
from tests.clients import models
from tests.mnist import load_mnist, split

Removal = Mapping[str, list[int]]  # first producer of a group -> ORIGINAL indices to remove


def _plan(
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


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean = torch.randn(m.num_features, generator=g)
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g)


def _residual(planted: bool) -> Residual:
    torch.manual_seed(0)
    net = Residual().eval()
    _randomize_bn(net)
    if planted:  # channels 5..7 = B · channels 0..4 + offset, in p1 + p2 (BN keeps it affine)
        B = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            for p in (net.p1, net.p2):
                assert p.bias is not None
                p.weight[5:] = torch.einsum("rk,kiyx->riyx", B, p.weight[:5])
                p.bias[5:] = B @ p.bias[:5] + 0.3
    return net


def _chain(planted: bool) -> Chain:
    torch.manual_seed(0)
    net = Chain().eval()
    if planted:  # relu(2z) = 2 relu(z): channels 6, 7 of a and b are 2 × channels 0, 1
        with torch.no_grad():
            for conv in (net.a, net.b):
                assert conv.bias is not None
                conv.weight[6:] = 2 * conv.weight[:2]
                conv.bias[6:] = 2 * conv.bias[:2]
    return net


def _data(n: int, seed: int, size: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _outputs(
    make: Callable[[bool], nn.Module], planted: bool, removal: Removal, compensate: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(original outputs, pruned outputs) on held-out data."""
    net = make(planted)
    size = 12 if isinstance(net, Chain) else 4
    x = torch.zeros(1, 3, size, size)
    held_out = _data(32, 7, size)
    with torch.no_grad():
        before = net(held_out)
    calibration = [_data(64, 0, size)]
    stats = capture_activations(net, calibration, maps=False).stats() if compensate else None
    plan, sidecar = _plan(net, build_manifest(net, x), removal, stats)
    apply_plan(net, plan, x, compensation=sidecar if compensate else None)
    with torch.no_grad():
        return before, net(held_out)


def _error(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((after - before).pow(2).mean() / before.pow(2).mean())


def test_exact_linear_combinations_are_folded_exactly() -> None:
    before, after = _outputs(_residual, True, {"p1": [5, 6, 7]}, True)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    _, plain = _outputs(_residual, True, {"p1": [5, 6, 7]}, False)
    assert _error(before, plain) > 1e-2  # without the fold the same removal shows
    before, after = _outputs(_chain, True, {"a": [6, 7], "b": [6, 7]}, True)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)  # 3×3 and flatten → linear


@pytest.mark.parametrize(
    ("make", "removal"),
    [
        (_residual, {"p1": [1, 4, 6]}),  # two consumers (one without bias, followed by BN)
        (_chain, {"a": [0, 3, 5]}),  # 3×3 consumer
        (_chain, {"b": [1, 2, 4]}),  # linear after flatten (per_channel 36)
    ],
)
def test_fold_reduces_the_error_of_independent_channels(
    make: Callable[[bool], nn.Module], removal: Removal
) -> None:
    before, folded = _outputs(make, False, removal, True)
    _, plain = _outputs(make, False, removal, False)
    assert _error(before, folded) < 0.8 * _error(before, plain)


def test_creates_a_bias_and_accepts_the_plan_path(tmp_path: Path) -> None:
    net = _residual(True)
    x = torch.zeros(1, 3, 4, 4)
    stats = capture_activations(net, [_data(64, 0)], maps=False).stats()
    plan, sidecar = _plan(net, build_manifest(net, x), {"p1": [5, 6, 7]}, stats)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    (tmp_path / ("plan" + SIDECAR_SUFFIX)).write_bytes(sidecar)
    assert net.c1.bias is None
    apply_plan(net, path, x)  # the sidecar is found next to the plan
    assert net.c1.bias is not None and net.c1.bias.shape == (6,)
    assert net.c1.weight.shape == (6, 5, 1, 1) and net.p2.weight.shape == (5, 8, 1, 1)


def test_grouped_consumer_folds_within_its_conv_groups() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1, groups=2)  # input channels 0-3 | 4-7
    x = torch.randn(2, 8, 5, 5)
    x[:, 3] = 2 * x[:, 1]  # group 0: channel 3 = 2 · channel 1 (no offset: padding stays exact)
    x[:, 6] = 0.5 * x[:, 4] - x[:, 5]  # group 1
    with torch.no_grad():
        before = conv(x)
        kept, removed = [0, 1, 2, 4, 5, 7], [3, 6]
        B = np.zeros((2, 6))
        B[0, 1], B[1, 3], B[1, 4] = 2.0, 0.5, -1.0
        fold_module(conv, Fold("conv", kept, removed, B, np.zeros(2)))
        x[:, removed] = 0  # the removed inputs no longer reach the conv
        assert torch.allclose(conv(x), before, atol=1e-5)


def _bad_cases(
    net: Residual, plan: PruningPlan, sidecar: bytes, tmp: Path
) -> list[tuple[str, PruningPlan | Path, object, str]]:
    """(what, plan, compensation argument, words of the error)."""
    comp = plan.compensation
    assert comp is not None
    tampered = bytearray(sidecar)
    tampered[-1] ^= 1
    wrong_shape: dict[str, np.ndarray] = {
        fold_keys(f.group, f.consumer)[0]: np.zeros((2, 2)) for f in comp.folds
    }
    wrong_shape |= {fold_keys(f.group, f.consumer)[1]: np.zeros(3) for f in comp.folds}
    data = encode_sidecar(wrong_shape)
    reshaped = plan.model_copy(
        update={"compensation": comp.model_copy(
            update={"sidecar_sha256": sidecar_sha256(data), "sidecar_bytes": len(data)}
        )}
    )  # fmt: skip
    renamed = [comp.folds[0].model_copy(update={"consumer": "nope", "weight": "nope.weight"})]
    renamed += comp.folds[1:]
    foreign = plan.model_copy(update={"compensation": comp.model_copy(update={"folds": renamed})})
    lonely = tmp / "lonely.json"
    lonely.write_text(plan.to_json())
    return [
        ("tampered sidecar", plan, bytes(tampered), "is not the one the plan pins"),
        ("no sidecar", plan, None, "no sidecar was given"),
        ("no sidecar next to the plan", lonely, None, "cannot be read"),
        ("wrong shapes", reshaped, data, "not [3, 5]/[3]"),
        ("another model's consumer", foreign, sidecar, "'nope' is not a module"),
    ]


def test_bad_sidecars_are_refused_before_any_weight_changes(tmp_path: Path) -> None:
    net = _residual(True)
    x = torch.zeros(1, 3, 4, 4)
    stats = capture_activations(net, [_data(64, 0)], maps=False).stats()
    plan, sidecar = _plan(net, build_manifest(net, x), {"p1": [5, 6, 7]}, stats)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for what, bad_plan, comp, words in _bad_cases(net, plan, sidecar, tmp_path):
        with pytest.raises(PlanMismatchError, match=re.escape(words)):
            apply_plan(net, bad_plan, x, compensation=comp)  # type: ignore[arg-type]
        state = net.state_dict()
        assert state.keys() == before.keys(), what
        assert all(torch.equal(before[k], state[k]) for k in before), what
    plain, _ = _plan(net, build_manifest(net, x), {"p1": [5, 6, 7]}, None)
    with pytest.raises(PlanMismatchError, match="carries no compensation"):
        apply_plan(net, plain, x, compensation=sidecar)
    other = _chain(False)  # a plan for another model fails before its folds are looked at
    with pytest.raises(PlanMismatchError):
        apply_plan(other, plan, torch.zeros(1, 3, 12, 12), compensation=sidecar)


def test_recalibrate_re_estimates_batchnorm() -> None:
    net = _residual(False)
    net.bn.momentum = 0.3
    batch = _data(16, 3)
    seen: list[torch.Tensor] = []
    hook = net.bn.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    assert recalibrate_batchnorm(net, [(batch, torch.zeros(16))]) == 16
    hook.remove()
    z, mean, var = seen[0], net.bn.running_mean, net.bn.running_var
    assert mean is not None and var is not None
    assert torch.allclose(mean, z.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(var, z.var(dim=(0, 2, 3), unbiased=True), atol=1e-4)
    assert not net.training and not net.bn.training and net.bn.momentum == 0.3
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_batchnorm(net, [])
    x = torch.zeros(1, 3, 4, 4)
    plan, _ = _plan(net, build_manifest(net, x), {"p1": [0, 1]}, None)
    apply_plan(net, plan, x, recalibrate=[batch])
    with torch.no_grad():
        y = net.p1(torch.relu(net.stem(batch))) + net.p2(torch.relu(net.stem(batch)))
    assert net.bn.running_mean is not None
    assert torch.allclose(net.bn.running_mean, y.mean(dim=(0, 2, 3)), atol=1e-5)


def _planned(
    net: nn.Module, x: torch.Tensor, calibration: torch.Tensor, tmp: Path, *, flops: float
) -> dict[bool, nn.Module]:
    """capture → plan_layers(stats) → save_plan → apply_plan(path), with and without
    compensation: the user's path end to end."""
    torch.save(net.state_dict(), tmp / "model.pt")
    parsed = read_checkpoint(tmp / "model.pt")
    manifest = build_manifest(net, x)
    stats = capture_activations(net, calibration.split(64), maps=False).stats()
    out = {}
    for comp in (False, True):
        plan = plan_layers(
            parsed.layers, method="l1", target=Target(flops=flops), manifest=manifest,
            params_total=parsed.info.n_params, stats=stats, compensation=comp,
            checkpoint_sha256=parsed.info.sha256,
        )  # fmt: skip
        path = tmp / f"plan-{comp}.json"
        side = save_plan(plan, path)
        assert (side is not None) == comp and plan.groups
        pruned = copy.deepcopy(net)
        apply_plan(pruned, path, x, checkpoint_sha256=parsed.info.sha256)  # finds the sidecar
        out[comp] = pruned
        in_memory = apply_plan(copy.deepcopy(net), plan, x)  # the plan object carries it
        same = zip(in_memory.state_dict().values(), pruned.state_dict().values(), strict=True)
        assert all(torch.equal(a, b) for a, b in same)
    return out


def test_plans_made_from_statistics_apply_with_their_sidecar(tmp_path: Path) -> None:
    for make, size in ((_residual, 4), (_chain, 12)):
        net = make(False)
        held_out = _data(32, 7, size)
        with torch.no_grad():
            before = net(held_out)
        pruned = _planned(
            net, torch.zeros(1, 3, size, size), _data(64, 0, size), tmp_path, flops=0.2
        )
        with torch.no_grad():
            errors = {comp: _error(before, m(held_out)) for comp, m in pruned.items()}
        assert errors[True] < 0.5 * errors[False], make.__name__


@pytest.mark.real
def test_real_digit_cnn_keeps_more_accuracy_with_compensation(
    realdata: Path, tmp_path: Path
) -> None:
    net = models.digit_cnn()
    net.load_state_dict(torch.load(realdata / "digit_cnn.pth", weights_only=True))
    net.eval()
    images, labels = load_mnist(realdata)
    train, test = split(len(images))  # calibrate on training digits, measure on held-out ones

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(images[test]).argmax(1) == labels[test]).float().mean())

    pruned = _planned(net, torch.zeros(1, 1, 28, 28), images[train[:512]], tmp_path, flops=0.7)
    assert accuracy(pruned[True]) > accuracy(pruned[False])
