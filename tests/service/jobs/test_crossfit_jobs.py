"""A job whose activations file holds held-out statistics (``holdout/<module>``) plans and
reports cross-fitted, exactly as the library does with them (``plan_layers(holdout_stats=)``,
``functional_figures(holdout=)``); ``crossfit=false`` is in-sample, as a file without them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from clients import PruneGraphClient
from clients.activations import capture_activations
from graphs.contracts.activations import HOLDOUT_PREFIX
from graphs.functional_report import CROSSFIT_NOTE, functional_figures
from graphs.manifest import Manifest
from graphs.plan import PruningPlan, Target
from graphs.planner import plan_layers
from service.jobs.inputs import load_inputs
from service.main import create_app
from service.settings import Settings
from tests.prunegraph.stats_net import save_net

TARGET = {"flops": 0.4}


@dataclass(frozen=True)
class Files:
    ckpt: Path
    manifest: Manifest
    own: Path  # 4 batches, every second one also held out (the default capture)
    none: Path  # the same batches, nothing held out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("crossfit-jobs")
    net, manifest = save_net(root)
    seeds = [torch.Generator().manual_seed(i) for i in (4, 5, 6, 7)]
    batches = [torch.randn(32, 3, 4, 4, generator=g) for g in seeds]
    own = capture_activations(net, batches, maps=False).save(root / "own.safetensors")
    none = capture_activations(net, batches, maps=False, holdout_every=0)
    return Files(root / "net.pt", manifest, own, none.save(root / "none.safetensors"))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PruneGraphClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("crossfit-service"), workers=1)
    with TestClient(create_app(settings)) as tc:
        yield PruneGraphClient("http://testserver", http=tc)


def direct(files: Files, crossfit: bool) -> PruningPlan:
    inputs = load_inputs(files.ckpt, manifest=files.manifest, activations=files.own)
    parsed = inputs.checkpoint
    return plan_layers(
        parsed.layers, method="l1", target=Target(**TARGET), params_total=parsed.info.n_params,
        manifest=inputs.manifest, checkpoint_sha256=parsed.info.sha256, stats=inputs.stats,
        holdout_stats=inputs.holdout if crossfit else None,
    )  # fmt: skip


def run(client: PruneGraphClient, files: Files, acts: Path, **kw: object) -> str:
    ckpt_id = client.upload(files.ckpt)
    job_id = client.submit(
        ckpt_id, methods=["l1"], target=TARGET, plan_method="l1", manifest=files.manifest,
        activations_id=client.upload_activations(ckpt_id, acts), **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    status = client.wait(job_id, timeout=300)
    assert status.status == "done", status.error
    return job_id


def test_a_job_plans_and_reports_cross_fitted_by_default(
    files: Files, client: PruneGraphClient
) -> None:
    job = run(client, files, files.own)
    plan = client.plan(job)
    assert plan.to_json() == direct(files, True).to_json() != direct(files, False).to_json()
    assert "cross-fitted error curves" in plan.rule
    assert "crossfit" not in client.job(job).request  # the default is not stored
    report = client.report(job)
    assert report.notes == [CROSSFIT_NOTE]
    inputs = load_inputs(files.ckpt, manifest=files.manifest, activations=files.own)
    layers, stats = inputs.checkpoint.layers, inputs.stats
    assert stats is not None
    figures = {la.name: la.functional for la in report.layers if la.functional}
    assert figures == functional_figures(layers, files.manifest, stats, holdout=inputs.holdout)


def test_crossfit_false_is_in_sample_as_a_file_without_held_out_statistics(
    files: Files, client: PruneGraphClient
) -> None:
    job = run(client, files, files.own, crossfit=False)
    assert client.job(job).request["crossfit"] is False
    plan, report = client.plan(job), client.report(job)
    assert plan.to_json() == direct(files, False).to_json()
    assert "cross-fitted" not in plan.rule and report.notes == []
    none = run(client, files, files.none)
    assert client.plan(none).to_json() == plan.to_json()
    assert client.report(none).to_json() == report.to_json()
    # the same request twice: the same bytes
    again = run(client, files, files.own)
    assert client.plan(again).to_json() == direct(files, True).to_json()


def test_held_out_statistics_asymmetric_within_the_upload_check_still_plan(
    files: Files, tmp_path: Path
) -> None:
    """Ingest allows an asymmetry of 1e-6 (relative), the planner's Grams 1e-9: a held-out S
    that passes the upload is made exactly symmetric, so its job plans (cross-fitted) as the
    file's exactly symmetric original does."""
    tensors = load_file(files.own)
    with safe_open(files.own, "np") as f:
        meta = f.metadata()
    for key in [k for k in tensors if k.startswith(HOLDOUT_PREFIX)]:
        h = tensors[key].copy()
        h[0, 1] += 1e-8 * float(np.abs(h).max())  # between the two tolerances
        tensors[key] = h
    skewed = tmp_path / "skewed.safetensors"
    save_file(tensors, str(skewed), metadata=meta)
    inputs = load_inputs(files.ckpt, manifest=files.manifest, activations=skewed)
    assert inputs.holdout is not None and inputs.holdout
    for name, h in inputs.holdout.items():
        raw = tensors[HOLDOUT_PREFIX + name]
        assert np.array_equal(h, h.T) and not np.array_equal(raw, raw.T)
        assert np.abs(h - raw).max() <= 1e-8 * np.abs(raw).max()
    parsed = inputs.checkpoint
    plan = plan_layers(
        parsed.layers, method="l1", target=Target(**TARGET), params_total=parsed.info.n_params,
        manifest=inputs.manifest, checkpoint_sha256=parsed.info.sha256, stats=inputs.stats,
        holdout_stats=inputs.holdout,
    )  # fmt: skip
    assert "cross-fitted error curves" in plan.rule
    want = direct(files, True)
    assert [g.remove for g in plan.groups] == [g.remove for g in want.groups]
