"""Activations through the HTTP API: upload tied to a checkpoint, ci and data-aware jobs, and
every mismatch refused with a clear 4xx."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as st_save

from clients.activations import capture_activations
from clients.manifest import build_manifest
from graphs.plan import PruningPlan
from graphs.report import Report
from service.main import create_app
from service.settings import Settings
from tests.clients import models

ALICE = {"Authorization": "Bearer a"}
BOB = {"Authorization": "Bearer b"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("acts-api")


@pytest.fixture(scope="module")
def client(data_dir: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=data_dir, tokens="alice:a,bob:b", workers=1)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.digit_cnn()


def _bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _acts_bytes(model: torch.nn.Module, tmp: Path, seed: int = 0) -> bytes:
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    path = capture_activations(model, [x], max_pixels=64).save(tmp / f"acts{seed}.safetensors")
    return path.read_bytes()


def _post(c: TestClient, url: str, data: bytes, headers: dict[str, str] = ALICE) -> Any:
    return c.post(url, files={"file": ("f.bin", data)}, headers=headers)


def _wait(c: TestClient, job: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body: dict[str, Any] = c.get(f"/v1/jobs/{job}", headers=ALICE).json()
        if body["status"] in ("done", "failed"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job} did not finish")


def test_ci_and_data_aware_jobs(
    client: TestClient, model: torch.nn.Module, tmp_path: Path, data_dir: Path
) -> None:
    ckpt = _post(client, "/v1/checkpoints", _bytes(model.state_dict())).json()["id"]
    r = _post(client, f"/v1/checkpoints/{ckpt}/activations", _acts_bytes(model, tmp_path))
    assert r.status_code == 201, r.text
    acts = r.json()
    assert acts["n_layers"] == 5 and acts["n_samples"] == 16
    manifest = build_manifest(model, torch.zeros(1, 1, 28, 28)).model_dump(mode="json")
    body = {
        "checkpoint_id": ckpt, "methods": ["mrp", "hsc", "ci"], "activations_id": acts["id"],
        "options": {"vectors": "activations"}, "target": {"flops": 0.5}, "plan_method": "ci",
        "manifest": manifest,
    }  # fmt: skip
    job = _wait(client, client.post("/v1/jobs", json=body, headers=ALICE).json()["id"])
    assert job["status"] == "done", job
    report = Report.model_validate_json(
        client.get(f"/v1/jobs/{job['id']}/report", headers=ALICE).text
    )
    assert report.parameters["mrp"]["vectors"] == "activations"
    assert {layer.methods["ci"].n_samples for layer in report.layers} == {16, 1}  # convs, linears
    plan = PruningPlan.model_validate_json(
        client.get(f"/v1/jobs/{job['id']}/plan", headers=ALICE).text
    )
    assert plan.method == "ci" and plan.achieved["flops"] >= 0.5
    # the same upload again is the same id; the file is stored once
    again = _post(client, f"/v1/checkpoints/{ckpt}/activations", _acts_bytes(model, tmp_path))
    assert again.json()["id"] == acts["id"]
    assert (data_dir / "activations" / acts["id"]).is_file()


def test_mismatched_and_foreign_activations_are_refused(
    client: TestClient, model: torch.nn.Module, tmp_path: Path
) -> None:
    ckpt = _post(client, "/v1/checkpoints", _bytes(model.state_dict())).json()["id"]
    url = f"/v1/checkpoints/{ckpt}/activations"
    other = models.mtcnn_rnet()  # another model's maps: names do not exist
    x = torch.randn(4, 3, 24, 24)
    wrong = capture_activations(other, [x]).save(tmp_path / "other.safetensors").read_bytes()
    r = _post(client, url, wrong)
    assert r.status_code == 422 and "does not have" in r.json()["error"], r.text
    good = capture_activations(model, [torch.randn(4, 1, 28, 28)])
    key = good.layers["conv_layers.3"]
    good.tensors[key] = good.tensors[key][:, :10]  # 10 channels where the layer has 64
    narrow = good.save(tmp_path / "narrow.safetensors").read_bytes()
    r = _post(client, url, narrow)
    assert r.status_code == 422 and "64" in r.json()["error"] and r.json()["hint"], r.text
    plain = st_save({"w": torch.zeros(3, 3)})  # safetensors, but not activations
    for data in (plain, b"\x00" * 100, _bytes(model.state_dict())):
        r = _post(client, url, data)
        assert 400 <= r.status_code < 500 and r.json()["hint"], r.text
        assert "capture_activations" in r.json()["hint"], r.text  # not the checkpoint's hint
    nan = capture_activations(model, [torch.randn(2, 1, 28, 28)])
    nan.tensors[nan.layers["conv_layers.0"]][0, 0, 0] = float("nan")
    r = _post(client, url, nan.save(tmp_path / "nan.safetensors").read_bytes())
    assert r.status_code == 422 and "NaN" in r.json()["error"]
    assert _post(client, url, _acts_bytes(model, tmp_path), headers=BOB).status_code == 404
    assert not list((tmp_path.parent).glob("tmp/*"))


def test_jobs_that_need_activations(
    client: TestClient, model: torch.nn.Module, tmp_path: Path, data_dir: Path
) -> None:
    ckpt = _post(client, "/v1/checkpoints", _bytes(model.state_dict())).json()["id"]
    for body in (
        {"checkpoint_id": ckpt, "methods": ["ci"]},
        {"checkpoint_id": ckpt, "methods": ["mrp"], "options": {"vectors": "activations"}},
        {"checkpoint_id": ckpt, "methods": ["l1"], "target": {"params": 0.3}, "plan_method": "ci"},
    ):
        r = client.post("/v1/jobs", json=body, headers=ALICE)
        assert r.status_code == 422 and "activations" in r.json()["error"], r.text
    body = {"checkpoint_id": ckpt, "methods": ["ci"], "activations_id": "0" * 64}
    r = client.post("/v1/jobs", json=body, headers=ALICE)
    assert r.status_code == 404 and "POST /v1/checkpoints" in r.json()["hint"]
    aid = _post(client, f"/v1/checkpoints/{ckpt}/activations", _acts_bytes(model, tmp_path, 1))
    path = data_dir / "activations" / aid.json()["id"]
    assert path.is_file()
    assert client.delete(f"/v1/checkpoints/{ckpt}", headers=ALICE).status_code == 204
    assert not path.exists()  # deleted with its checkpoint
    meta = json.loads(json.dumps(aid.json()))
    assert meta["checkpoint_id"] == ckpt
