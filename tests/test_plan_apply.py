"""Plans applied to live models: every method (ci on captured feature maps), 30 % and 50 %
FLOPs, six architectures.

The pruned model must run, have exactly the plan's parameter count, MACs within 1 % of the plan,
and a FLOPs reduction within ±2 points of the target; coupled layers keep equal widths.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

from clients import apply_plan, build_manifest, capture_activations
from graphs.manifest import Manifest
from graphs.plan import PLAN_METHODS, Target
from graphs.planner import plan_layers
from service.ingest.checkpoint import ParsedCheckpoint, read_checkpoint
from tests.clients import models


@dataclass
class Case:
    model: nn.Module
    x: torch.Tensor
    manifest: Manifest
    parsed: ParsedCheckpoint
    activations: dict[str, np.ndarray]


def _case(
    tmp: Path, factory: Callable[[], nn.Module], x: torch.Tensor, weights: Path | None
) -> Case:
    torch.manual_seed(0)
    model = factory()
    if weights is not None:
        model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    path = tmp / "model.pt"
    torch.save(model.state_dict(), path)
    batch = torch.randn((8, *x.shape[1:]), generator=torch.Generator().manual_seed(0))
    acts = capture_activations(model, [batch], max_pixels=64).arrays()  # for ci plans
    return Case(model, x, build_manifest(model, x), read_checkpoint(path), acts)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str | None]] = {
    "resnet56": (lambda: models.resnet56("A"), (1, 3, 32, 32), None),
    "resnet56B": (lambda: models.resnet56("B"), (1, 3, 32, 32), None),
    "resnet50": (models.resnet50, (1, 3, 64, 64), None),
    "vgg16_bn": (models.vgg16_bn, (1, 3, 32, 32), None),
    "mobilenet_v2": (models.mobilenet_v2, (1, 3, 96, 96), "mobilenet_v2_imagenet.pth"),
    "digit_cnn": (models.digit_cnn, (1, 1, 28, 28), "digit_cnn.pth"),
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    return {}


def _get(cases: dict[str, Case], name: str, request: pytest.FixtureRequest, tmp: Path) -> Case:
    if name not in cases:
        factory, shape, weights = MODELS[name]
        path = None
        if weights is not None:
            realdata: Path = request.getfixturevalue("realdata")
            path = realdata / weights
        cases[name] = _case(tmp, factory, torch.zeros(shape), path)
    return cases[name]


def _macs(model: nn.Module, x: torch.Tensor) -> float:
    macs, _ = tp.utils.count_ops_and_params(model, x)
    return float(macs)


NAMES = [pytest.param(n, marks=[pytest.mark.real] if MODELS[n][2] else [], id=n) for n in MODELS]


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("method", PLAN_METHODS)
@pytest.mark.parametrize("name", NAMES)
def test_plan_and_apply(
    cases: dict[str, Case],
    name: str,
    method: str,
    ratio: float,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    case = _get(cases, name, request, tmp_path)
    plan = plan_layers(
        case.parsed.layers,
        method=method,  # type: ignore[arg-type]
        target=Target(flops=ratio),
        params_total=case.parsed.info.n_params,
        manifest=case.manifest,
        checkpoint_sha256=case.parsed.info.sha256,
        activations=case.activations,
    )
    assert plan.coupling == "manifest"
    assert plan.params_before == sum(p.numel() for p in case.model.parameters())
    pruned = apply_plan(
        copy.deepcopy(case.model), plan, case.x, checkpoint_sha256=plan.checkpoint_sha256
    )
    with torch.no_grad():
        y = pruned(case.x)
    assert y.shape == case.model(case.x).shape
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after
    macs_before, macs_after = _macs(case.model, case.x), _macs(pruned, case.x)
    assert plan.flops_after is not None
    assert abs(macs_after - plan.flops_after) <= 0.01 * plan.flops_after
    achieved = 1 - macs_after / macs_before
    assert ratio - 0.02 <= achieved <= ratio + 0.02, (achieved, plan.rule)
    modules = dict(pruned.named_modules())
    for g in plan.groups:  # coupled producers keep equal widths, as planned
        for p in g.producers:
            w = modules[p].weight  # type: ignore[union-attr]
            assert w.shape[0] == g.channels_after, (p, w.shape, g.channels_after)
