"""Plans made from captured statistics (graphs.planner.plan_layers(stats=...)) applied with
their sidecar: the user's path end to end, on small models and the real digit CNN."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from clients import apply_plan, build_manifest, capture_activations
from graphs.compensated import save_plan
from graphs.plan import Target
from graphs.planner import plan_layers
from service.ingest.checkpoint import read_checkpoint
from tests.clients import models
from tests.clients.fold_models import chain, data, error, residual
from tests.mnist import load_mnist, split


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
    for make, size in ((residual, 4), (chain, 12)):
        net = make(False)
        held_out = data(32, 7, size)
        with torch.no_grad():
            before = net(held_out)
        pruned = _planned(
            net, torch.zeros(1, 3, size, size), data(64, 0, size), tmp_path, flops=0.2
        )
        with torch.no_grad():
            errors = {comp: error(before, m(held_out)) for comp, m in pruned.items()}
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
