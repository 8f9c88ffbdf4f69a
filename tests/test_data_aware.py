"""Data-aware pruning end to end on the real digit CNN and real MNIST digits: capture, upload,
ci plan at 50 % FLOPs through the service, apply, forward; and the same through the CLI."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from clients import PruneGraphClient, apply_plan, build_manifest
from clients.activations import capture_activations
from graphs.plan import PruningPlan
from prunegraph.cli import app as cli
from service.main import create_app
from service.settings import Settings
from tests.clients import models
from tests.mnist import load_mnist, split

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def digits(realdata: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return load_mnist(realdata)


@pytest.fixture(scope="module")
def model(realdata: Path) -> torch.nn.Module:
    net = models.digit_cnn()
    net.load_state_dict(torch.load(realdata / "digit_cnn.pth", weights_only=True))
    return net.eval()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PruneGraphClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("data-aware"), workers=1)
    with TestClient(create_app(settings)) as tc:
        yield PruneGraphClient("http://testserver", http=tc)


def _accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def test_ci_plan_through_the_service_applies_and_runs(
    client: PruneGraphClient,
    model: torch.nn.Module,
    digits: tuple[torch.Tensor, torch.Tensor],
    realdata: Path,
) -> None:
    x, y = digits
    calib_idx, test_idx = split(len(x))
    calibration = [x[calib_idx[i : i + 64]] for i in range(0, 256, 64)]  # 256 real digits
    example = torch.zeros(1, 1, 28, 28)
    plan = client.plan(
        model, example, target_flops=0.5, method="ci", calibration=calibration,
        checkpoint=realdata / "digit_cnn.pth",
    )  # fmt: skip
    assert plan.method == "ci" and plan.achieved["flops"] >= 0.5
    before = _accuracy(model, x[test_idx], y[test_idx])
    assert before > 0.95  # the real checkpoint on real digits
    pruned = models.digit_cnn()
    pruned.load_state_dict(model.state_dict())
    apply_plan(pruned, plan, example)
    out = pruned.eval()(x[test_idx[:32]])
    assert out.shape == (32, 10) and torch.isfinite(out).all()
    widths = {g.name: g.channels_after for g in plan.groups}
    assert pruned.conv_layers[3].out_channels == widths["conv_layers.3"]
    assert 0.0 <= _accuracy(pruned, x[test_idx], y[test_idx]) <= 1.0  # no fine-tune: any value


def test_ci_cli_embedded_with_activations_file(
    model: torch.nn.Module, digits: tuple[torch.Tensor, torch.Tensor], realdata: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    x, _ = digits
    # feature maps only: --vectors decides what the graph methods compare (with second moments
    # they compare correlations at the consumer inputs: tests/test_compensated.py)
    acts = capture_activations(model, [x[:128]], seed=0, statistics=False).save(
        tmp_path / "acts.safetensors"
    )
    manifest = tmp_path / "m.json"
    manifest.write_text(build_manifest(model, torch.zeros(1, 1, 28, 28)).model_dump_json())
    runner = CliRunner()
    args = ["plan", str(realdata / "digit_cnn.pth"), "--method", "ci", "--target-flops", "0.5",
            "--manifest", str(manifest), "--activations", str(acts), "--json"]  # fmt: skip
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.stderr
    plan = PruningPlan.model_validate_json(res.stdout)
    assert plan.achieved["flops"] >= 0.5
    without = [a for a in args if a not in ("--activations", str(acts))]
    res = runner.invoke(cli, without)
    assert res.exit_code == 2 and "need feature maps" in res.stderr
    report = runner.invoke(
        cli, ["analyze", str(realdata / "digit_cnn.pth"), "--methods", "mrp,ci",
              "--vectors", "activations", "--activations", str(acts), "--json"],
    )  # fmt: skip
    assert report.exit_code == 0, report.stderr
    assert '"vectors": "activations"' in report.stdout
    # --vectors auto (the default): graph methods compare the maps when a file is given
    mrp = [a if a != "ci" else "mrp" for a in args]
    plans = {}
    for extra in ([], ["--vectors", "weights"], ["--vectors", "activations"]):
        res = runner.invoke(cli, mrp + extra)
        assert res.exit_code == 0, res.stderr
        plans[" ".join(extra)] = PruningPlan.model_validate_json(res.stdout)
    assert plans[""].parameters.get("vectors") == "activations"
    assert plans[""].to_json() == plans["--vectors activations"].to_json()
    assert "vectors" not in plans["--vectors weights"].parameters
    res = runner.invoke(cli, [a for a in mrp if a not in ("--activations", str(acts))])
    assert (
        res.exit_code == 0
        and "vectors" not in PruningPlan.model_validate_json(res.stdout).parameters
    )  # no maps: weights


def test_graph_plans_compare_feature_maps_when_calibration_is_given(
    client: PruneGraphClient,
    model: torch.nn.Module,
    digits: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Calibration batches cost a capture: the graph methods then compare the maps, unless the
    options chose the vectors themselves."""
    from clients.job_request import data_aware_options
    from graphs.options import AnalysisOptions

    x, _ = digits
    calibration = [x[:64], x[64:128]]
    example = torch.zeros(1, 1, 28, 28)
    aware = client.plan(model, example, target_flops=0.3, method="mrp", calibration=calibration)
    assert aware.parameters.get("vectors") == "activations"
    # the capture records second moments too: the plan is compensated (its sidecar comes with
    # it), and the graph methods compare the channels' correlations from the statistics
    assert aware.compensation is not None
    apply_plan(copy.deepcopy(model), aware, example)
    assert data_aware_options(AnalysisOptions(alpha=0.1), True) == AnalysisOptions(
        alpha=0.1, vectors="activations"
    )
    explicit = AnalysisOptions(vectors="weights")
    assert data_aware_options(explicit, True) is explicit
    assert data_aware_options(None, False) is None
    assert data_aware_options({"k": 3}, True) == {"k": 3, "vectors": "activations"}
