"""Compensated plans end to end on the real digit CNN and real MNIST digits (design §8).

CLI: capture second moments → ``plan --activations`` → plan + sidecar written → apply_plan
folds it → the pruned model keeps at least the accuracy of the ``--no-compensation`` plan (the
same channels, no folds) on held-out digits; ``analyze --activations`` reports functional
redundancy and its curve. Service: a job with those activations gives the same plan, its
sidecar is downloadable (sha256 pinned) and the client's plan applies with it."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from clients import PruneGraphClient, apply_plan, build_manifest
from clients.activations import capture_activations
from graphs import Report
from graphs.compensated_plan import DEFAULT_ALLOCATION
from graphs.plan import PruningPlan
from prunegraph.cli import app as cli
from service.main import create_app
from service.settings import Settings
from tests.clients import models
from tests.mnist import load_mnist, split

pytestmark = pytest.mark.real
runner = CliRunner()
TARGET = "0.7"
METHOD = "l1"  # its choice ignores the statistics: the folds make the difference
EXAMPLE = torch.zeros(1, 1, 28, 28)


@dataclass(frozen=True)
class Setup:
    ckpt: Path
    manifest: Path
    stats: Path
    root: Path
    model: torch.nn.Module
    x_test: torch.Tensor
    y_test: torch.Tensor


@pytest.fixture(scope="module")
def setup(realdata: Path, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("compensated")
    net = models.digit_cnn()
    net.load_state_dict(torch.load(realdata / "digit_cnn.pth", weights_only=True))
    net.eval()
    x, y = load_mnist(realdata)
    calib, test = split(len(x))  # calibration and evaluation digits never overlap
    stats = capture_activations(net, [x[calib[:512]]], maps=False).save(root / "stats.safetensors")
    manifest = root / "manifest.json"
    manifest.write_text(build_manifest(net, EXAMPLE).model_dump_json())
    return Setup(realdata / "digit_cnn.pth", manifest, stats, root, net, x[test], y[test])


def _plan_args(s: Setup, *extra: str) -> list[str]:
    return ["plan", str(s.ckpt), "--manifest", str(s.manifest), "--activations", str(s.stats),
            "--target-flops", TARGET, "--method", METHOD, *extra]  # fmt: skip


def _accuracy(s: Setup, plan: Path | PruningPlan) -> float:
    net = copy.deepcopy(s.model)
    apply_plan(net, plan, EXAMPLE)
    with torch.no_grad():
        return float((net.eval()(s.x_test).argmax(1) == s.y_test).float().mean())


@pytest.fixture(scope="module")
def cli_plans(setup: Setup) -> dict[str, tuple[Path, str, str]]:
    """Compensated and --no-compensation plans written with -o: path, stdout, stderr."""
    out = {}
    for name, extra in (("comp", []), ("plain", ["--no-compensation"])):
        (setup.root / name).mkdir()
        path = setup.root / name / "plan.json"
        res = runner.invoke(cli, _plan_args(setup, *extra, "-o", str(path)))
        assert res.exit_code == 0, res.stderr
        out[name] = (path, res.stdout, res.stderr)
    return out


def test_cli_compensated_plan_writes_its_sidecar_and_keeps_more_accuracy(
    setup: Setup, cli_plans: dict[str, tuple[Path, str, str]]
) -> None:
    path, stdout, stderr = cli_plans["comp"]
    plan = PruningPlan.model_validate_json(path.read_text())
    assert plan.compensation is not None and plan.compensation.folds
    side = path.with_name("plan.fold.safetensors")
    data = side.read_bytes()
    assert hashlib.sha256(data).hexdigest() == plan.compensation.sidecar_sha256
    assert len(data) == plan.compensation.sidecar_bytes
    assert str(side) in stderr.replace("\n", "") and "folds" in stderr
    # the table: per group its functional redundancy and predicted output error
    assert "functional" in stdout and "pred. error" in stdout
    for g in plan.groups:
        if g.predicted_error is not None and g.remove:
            assert f"{g.predicted_error:.2e}" in stdout
    plain_path, _, plain_err = cli_plans["plain"]
    plain = PruningPlan.model_validate_json(plain_path.read_text())
    assert plain.compensation is None and not plain_path.with_name("plan.fold.safetensors").exists()
    assert "fold" not in plain_err
    # --no-compensation removes the same channels: the difference is the folds alone
    assert [g.remove for g in plain.groups] == [g.remove for g in plan.groups]
    assert plan.achieved["flops"] >= float(TARGET)
    with_folds, without = _accuracy(setup, path), _accuracy(setup, plain_path)
    assert with_folds >= without, (with_folds, without)


def test_cli_analyze_reports_functional_redundancy_and_curves(
    setup: Setup, cli_plans: dict[str, tuple[Path, str, str]]
) -> None:
    args = ["analyze", str(setup.ckpt), "--manifest", str(setup.manifest), "--methods", "mrp"]
    res = runner.invoke(cli, [*args, "--activations", str(setup.stats), "--json"])
    assert res.exit_code == 0, res.stderr
    report = Report.model_validate_json(res.stdout)
    figures = {layer.name: layer.functional for layer in report.layers if layer.functional}
    plan = PruningPlan.model_validate_json(cli_plans["comp"][0].read_text())
    planned = {g.name: g for g in plan.groups if g.remove}
    assert planned and set(planned) <= set(figures)
    for layer in report.layers:
        f = layer.functional
        if f is None:
            continue
        e = np.asarray(f.errors)
        assert e[0] == 0 and np.all(np.diff(e) >= 0) and len(e) == layer.n_filters
        removable = int(np.searchsorted(e, f.epsilon, side="right")) - 1
        assert f.redundancy == pytest.approx(removable / layer.n_filters, abs=1e-6)
        if layer.name in planned:  # the plan's figure is the same path's
            assert planned[layer.name].functional_redundancy == pytest.approx(f.redundancy)
    table = runner.invoke(cli, [*args, "--activations", str(setup.stats)])
    assert table.exit_code == 0 and "functional" in table.stdout
    for f in figures.values():
        assert f"{f.redundancy:.3f}" in table.stdout
    plain = runner.invoke(cli, [*args, "--json"])
    assert plain.exit_code == 0 and '"functional"' not in plain.stdout  # absent without stats


def test_cli_bad_inputs(setup: Setup) -> None:
    res = runner.invoke(cli, _plan_args(setup, "--allocation", "greedy", "--json"))
    assert res.exit_code == 2 and "unknown allocation 'greedy'" in res.stderr
    dropped = ("--manifest", str(setup.manifest), "--target-flops", TARGET)
    no_manifest = [a for a in _plan_args(setup, "--target-params", "0.3") if a not in dropped]
    res = runner.invoke(cli, [*no_manifest, "--json"])
    assert res.exit_code == 0, res.stderr
    assert "need the model's manifest" in res.stderr
    assert PruningPlan.model_validate_json(res.stdout).compensation is None
    res = runner.invoke(cli, [*_plan_args(setup), "--method", "ci", "--json"])
    assert res.exit_code == 2 and "need feature maps" in res.stderr  # statistics are no maps


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PruneGraphClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("compensated-service"), workers=1)
    with TestClient(create_app(settings)) as tc:
        yield PruneGraphClient("http://testserver", http=tc)


def test_service_job_plan_sidecar_and_apply(
    setup: Setup, client: PruneGraphClient, cli_plans: dict[str, tuple[Path, str, str]]
) -> None:
    ckpt_id = client.upload(setup.ckpt)
    acts_id = client.upload_activations(ckpt_id, setup.stats)
    manifest = json.loads(setup.manifest.read_text())
    job = dict(methods=[METHOD], target={"flops": float(TARGET)}, plan_method=METHOD,
               manifest=manifest, activations_id=acts_id)  # fmt: skip
    job_id = client.submit(ckpt_id, **job)
    client.wait(job_id, timeout=300)
    plan = client.plan(job_id)
    assert plan.compensation is not None
    # the same plan as the embedded CLI (same defaults: compensated, the default allocation)
    assert plan.to_json() + "\n" == cli_plans["comp"][0].read_text()
    raw = client.transport.http.get(f"/v1/jobs/{job_id}/plan/compensation")
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/octet-stream"
    assert hashlib.sha256(raw.content).hexdigest() == plan.compensation.sidecar_sha256
    assert raw.content == cli_plans["comp"][0].with_name("plan.fold.safetensors").read_bytes()
    # the client's plan carries its sidecar: apply_plan folds it, as from the files
    assert _accuracy(setup, plan) == _accuracy(setup, cli_plans["comp"][0])
    # the report of a job with statistics has the functional figures
    report = client.report(job_id)
    assert any(layer.functional is not None for layer in report.layers)

    plain_id = client.submit(ckpt_id, **job, compensation=False)
    client.wait(plain_id, timeout=300)
    plain = client.plan(plain_id)
    assert plain.compensation is None
    assert plain.to_json() + "\n" == cli_plans["plain"][0].read_text()
    gone = client.transport.http.get(f"/v1/jobs/{plain_id}/plan/compensation")
    assert gone.status_code == 404 and "no compensation" in gone.json()["error"]
    bad = client.transport.http.post(
        "/v1/jobs",
        json={"checkpoint_id": ckpt_id, "allocation": "greedy", "target": {"flops": 0.5}},
    )
    assert bad.status_code == 422


def test_client_plan_for_with_statistics_only(setup: Setup, client: PruneGraphClient) -> None:
    """A statistics-only file (maps=False) makes plan_for's plan compensated; the graph
    methods are not asked to compare feature maps the file does not have."""
    from clients.job_request import has_feature_maps

    assert not has_feature_maps(setup.stats) and not has_feature_maps(None)
    plan = client.plan_for(
        setup.ckpt, target={"flops": 0.3}, method="mrp",
        manifest=json.loads(setup.manifest.read_text()), activations=setup.stats,
    )  # fmt: skip
    assert plan.compensation is not None and plan.parameters.get("allocation") == DEFAULT_ALLOCATION
    net = copy.deepcopy(setup.model)
    apply_plan(net, plan, EXAMPLE)  # the sidecar came with the plan
    plain = client.plan_for(
        setup.ckpt, target={"flops": 0.3}, method="mrp", compensation=False,
        manifest=json.loads(setup.manifest.read_text()), activations=setup.stats,
    )  # fmt: skip
    assert plain.compensation is None
    assert [g.remove for g in plain.groups] == [g.remove for g in plan.groups]
