"""FLOPs of models whose convs are subclasses of nn.Conv2d with their own ``forward``.

torch-pruning's ``count_ops_and_params`` matches module types exactly and misses the MACs of
timm's ``Conv2dSame``, EfficientNet-PyTorch's ``Conv2dStaticSamePadding`` or weight-standardized
convs. The references here: torch-pruning's count on plain ``nn.Conv*d`` models (the hook counter
of :mod:`clients.flops` must agree with it), and a plain twin of the subclass model (same
parameter shapes, same output shapes, so the same MACs). Plans at 30 % and 50 % FLOPs on the
subclass model must reach the target as measured by hooks, and ``apply_plan`` must prune those
modules so that the model still runs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch_pruning.utils import op_counter

from clients import ManifestError, apply_plan, build_manifest, capture_activations, flops
from graphs.manifest import Manifest
from graphs.plan import PLAN_METHODS, PruningPlan, Target
from graphs.planner import plan_layers
from service.ingest.checkpoint import ParsedCheckpoint, read_checkpoint
from tests.clients import models

X = torch.zeros(1, 3, 64, 64)


def fresh(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """A model in eval mode with seeded weights and non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = factory().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


def tp_layer_macs(model: nn.Module, x: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """torch-pruning's per-module MACs (whole batch) of the conv/linear layers."""
    _, _, layer_flops, _ = tp.utils.count_ops_and_params(model, x, layer_wise=True)
    return {
        n: float(layer_flops[m])
        for n, m in model.named_modules()
        if isinstance(m, flops.COUNTED) and layer_flops.get(m)
    }


def tp_total(model: nn.Module, x: tuple[torch.Tensor, ...]) -> float:
    """torch-pruning's MACs of all modules, per sample."""
    macs, _ = tp.utils.count_ops_and_params(model, x)
    return float(macs)


# --------------------------------------------------------------------------- plain references


class SeqModel(nn.Module):
    """Conv1d (strided, dilated, grouped, called twice) and linear layers on (N·T, F) and
    (N, T, F) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(8, 16, 5, stride=2, padding=2)
        self.c2 = nn.Conv1d(16, 16, 3, padding=2, dilation=2, groups=4, bias=False)
        self.c3 = nn.Conv1d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 12)
        self.out = nn.Linear(12, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c1(x))
        y = self.c3(self.c2(y)) + self.c2(y)
        z = F.relu(self.fc(y.transpose(1, 2).reshape(-1, 16)))  # (N·T, F): not batch first
        return self.out(z.reshape(x.shape[0], -1, 12))


class VolumeModel(nn.Module):
    """Conv3d: strided, depthwise, dilated, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv3d(2, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv3d(8, 8, 3, padding=1, groups=8, bias=False)
        self.c3 = nn.Conv3d(8, 6, 3, padding=2, dilation=2)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c3(F.relu(self.c2(F.relu(self.c1(x)))))
        return self.fc(y.mean((2, 3, 4)))


PLAIN: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "digit_cnn": (models.digit_cnn, (2, 1, 28, 28)),
    "mobilenet_v2": (models.mobilenet_v2, (2, 3, 64, 64)),  # depthwise, strided
    "resnet56B": (lambda: models.resnet56("B"), (2, 3, 32, 32)),
    "plain_twin": (models.plain_twin_convnet, (2, 3, 64, 64)),  # grouped, dilated, strided
    "seq_conv1d": (SeqModel, (2, 8, 40)),
    "volume_conv3d": (VolumeModel, (2, 2, 12, 12, 12)),
}


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_hook_count_agrees_with_torch_pruning_on_plain_models(name: str) -> None:
    factory, shape = PLAIN[name]
    model = fresh(factory)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)),)
    ours = flops.count_layer_macs(model, x)  # per sample
    theirs = tp_layer_macs(model, x)  # whole batch of 2
    assert ours.keys() == theirs.keys() and ours
    for layer, macs in ours.items():
        assert macs * shape[0] == pytest.approx(theirs[layer], abs=1), layer
    assert flops.count_model_macs(model, x) == pytest.approx(tp_total(model, x), abs=1)
    assert build_manifest(model, x).macs_total == round(tp_total(model, x))  # no refusal


def test_transposed_conv_counts_like_its_adjoint_conv() -> None:
    """A transposed conv does the MACs of the conv it is the adjoint of, read backwards: the
    reference is torch-pruning's count of that (plain) conv."""
    up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2, bias=False)
    x = torch.randn(1, 6, 9, 7)
    y = up(x)
    adjoint = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False)
    assert adjoint(y).shape == x.shape
    reference = tp_total(adjoint, (y,))
    assert flops.count_layer_macs(up, (x,)) == {"": pytest.approx(reference)}
    assert flops.count_model_macs(up, (x,)) == pytest.approx(reference)
    up_bias = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
    assert flops.count_model_macs(up_bias, (x,)) == pytest.approx(reference + y.numel())


# --------------------------------------------------------------------------- subclasses


class SubclassSeq(nn.Module):
    """1-d and 3-d "SAME" conv subclasses beside their plain twins' shapes."""

    def __init__(self, plain: bool) -> None:
        super().__init__()
        c1: Any = nn.Conv1d if plain else models.SameConv1d
        c3: Any = nn.Conv3d if plain else models.SameConv3d
        pad = {"padding": 2} if plain else {}
        self.a = c1(8, 16, 5, stride=1, dilation=1, groups=2, **pad)
        self.b = c3(2, 6, 5, **pad)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.a(x).mean() + self.b(v).mean()


def test_subclass_models_count_like_their_plain_twins() -> None:
    sub, plain = fresh(models.subclass_convnet), fresh(models.plain_twin_convnet)
    assert [p.shape for p in sub.parameters()] == [p.shape for p in plain.parameters()]
    reference = tp_layer_macs(plain, (X,))
    assert flops.count_layer_macs(sub, (X,)) == pytest.approx(reference)
    assert flops.count_model_macs(sub, (X,)) == pytest.approx(tp_total(plain, (X,)))
    m_sub, m_plain = build_manifest(sub, X), build_manifest(plain, X)
    assert m_sub.macs_total == m_plain.macs_total == round(tp_total(plain, (X,)))
    assert m_sub.costs == m_plain.costs and m_sub.groups == m_plain.groups
    assert m_sub.layers == m_plain.layers  # every subclass conv is a manifest layer
    assert len(m_sub.layers) == sum(isinstance(m, flops.COUNTED) for m in sub.modules())
    grouped = [g for g in m_sub.groups if "grouped convolution" in (g.reason or "")]
    assert grouped and all(not g.prunable for g in grouped)

    seq = (torch.randn(1, 8, 33), torch.randn(1, 2, 7, 8, 9))
    torch.manual_seed(0)
    sub1d, plain1d = SubclassSeq(False), SubclassSeq(True)
    assert flops.count_layer_macs(sub1d, seq) == pytest.approx(tp_layer_macs(plain1d, seq))


# --------------------------------------------------------------------------- plan and apply


def _parsed(model: nn.Module, tmp: Path) -> ParsedCheckpoint:
    path = tmp / "model.pt"
    torch.save(model.state_dict(), path)
    return read_checkpoint(path)


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Manifest, Any, Any]:
    model = fresh(models.subclass_convnet)
    batch = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    acts = capture_activations(model, [batch], max_pixels=64).arrays()
    parsed = _parsed(model, tmp_path_factory.mktemp("subclass"))
    return model, build_manifest(model, X), parsed, acts


def _plan(planned: Any, method: str, ratio: float) -> PruningPlan:
    _, manifest, parsed, acts = planned
    return plan_layers(
        parsed.layers,
        method=method,  # type: ignore[arg-type]
        target=Target(flops=ratio),
        params_total=parsed.info.n_params,
        manifest=manifest,
        checkpoint_sha256=parsed.info.sha256,
        activations=acts,
    )


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("method", PLAN_METHODS)
def test_plan_and_apply_reach_the_target_measured_by_hooks(
    planned: Any, method: str, ratio: float
) -> None:
    model, manifest, _, _ = planned
    plan = _plan(planned, method, ratio)
    assert plan.coupling == "manifest" and plan.flops_before == manifest.macs_total
    pruned = apply_plan(copy.deepcopy(model), plan, X, checkpoint_sha256=plan.checkpoint_sha256)
    types = {n: type(m) for n, m in model.named_modules()}
    assert {n: type(m) for n, m in pruned.named_modules()} == types  # subclasses kept
    with torch.no_grad():
        y = pruned(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 10) and bool(torch.isfinite(y).all())
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after

    before, after = flops.count_model_macs(model, (X,)), flops.count_model_macs(pruned, (X,))
    assert plan.flops_after is not None
    assert after == pytest.approx(plan.flops_after, rel=0.01)
    assert ratio - 0.02 <= 1 - after / before <= ratio + 0.02
    conv_before = sum(flops.count_layer_macs(model, (X,)).values())
    conv_after = sum(flops.count_layer_macs(pruned, (X,)).values())
    assert ratio - 0.02 <= 1 - conv_after / conv_before <= ratio + 0.02

    # the same plan on the plain twin: torch-pruning's count of it is the reference
    twin = fresh(models.plain_twin_convnet)
    twin.load_state_dict(model.state_dict())
    twin = apply_plan(twin, plan, X)
    assert after == pytest.approx(tp_total(twin, (X,)), abs=1)
    assert build_manifest(pruned, X).macs_total == round(after)


def test_apply_prunes_subclass_modules_like_plain_ones(planned: Any) -> None:
    """apply_plan keeps exactly the planned rows/columns of every subclass conv (and its BN):
    the pruned subclass model and the pruned plain twin have identical state dicts, equal to the
    original restricted to the kept entries of every pruned axis."""
    model, manifest = planned[0], planned[1]
    plan = _plan(planned, "l1", 0.5)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = apply_plan(copy.deepcopy(model), plan, X).state_dict()
    twin = fresh(models.plain_twin_convnet)
    twin.load_state_dict(original)
    pruned_twin = apply_plan(twin, plan, X).state_dict()
    assert pruned.keys() == pruned_twin.keys()
    assert all(torch.equal(pruned[k], pruned_twin[k]) for k in pruned)

    removed = {g.id: set(g.remove) for g in plan.groups}
    assert any(removed.values())
    expected = dict(original)
    for g in manifest.groups:
        keep = [c for c in range(g.channels) if c not in removed.get(g.id, set())]
        for pa in g.params:
            k = pa.per_channel
            idx = torch.tensor([c * k + j for c in keep for j in range(k)], dtype=torch.long)
            expected[pa.param] = expected[pa.param].index_select(pa.axis, idx)
    for name in manifest.param_shapes:  # parameters (the twin check covers the buffers)
        assert torch.equal(pruned[name], expected[name]), name


# --------------------------------------------------------------------------- the cross-check


def _exact_type_hook(module: nn.Module) -> Any:
    """torch-pruning's own lookup (exact types): blind to conv subclasses."""
    return op_counter.CUSTOM_MODULES_MAPPING.get(type(module)) or op_counter.MODULES_MAPPING.get(
        type(module)
    )


def test_cross_check_refuses_a_cost_model_blind_to_a_layer_type(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flops, "_hook_for", _exact_type_hook)
    build_manifest(fresh(models.plain_twin_convnet), X)  # exact types: counted, accepted
    with pytest.raises(ManifestError) as info:
        build_manifest(fresh(models.subclass_convnet), X)
    message = str(info.value)
    assert "more than 1%" in message and "No manifest was built" in message
    assert "Conv2dSame" in message and "StdConv2d" in message


def test_cross_check_tolerance() -> None:
    """Within 1 % of the independent total passes; beyond it, or a layer of 2 % unseen, fails."""
    rng = np.random.default_rng(0)
    counted = {f"l{i}": float(v) for i, v in enumerate(rng.uniform(1e3, 1e6, 20))}
    counted["small"] = 0.02 * sum(counted.values())
    total = sum(counted.values())
    types = dict.fromkeys(counted, "Conv2d")
    for off in (0.009, -0.009):
        flops.check_cost_model(dict(counted, l0=counted["l0"] + off * total), counted, types)
    for off in (0.011, -0.011):
        with pytest.raises(ManifestError, match=r"l0 \(Conv2d"):
            flops.check_cost_model(dict(counted, l0=counted["l0"] + off * total), counted, types)
    blind = {k: v for k, v in counted.items() if k != "small"}
    with pytest.raises(ManifestError, match=r"small \(Conv2d: cost model 0, hooks"):
        flops.check_cost_model(blind, counted, types)
