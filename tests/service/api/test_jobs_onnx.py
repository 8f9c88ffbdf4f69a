"""Jobs with an input shape for ONNX models with symbolic dims (the job API, the client and the
CLI agree with the library)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from clients import PruneGraphClient
from graphs import analyze
from graphs.report import Report
from service.ingest.checkpoint import read_checkpoint
from service.ingest.onnx_manifest import manifest_from_onnx
from service.main import create_app
from service.settings import Settings
from tests.service.onnx_models import model_of, reference_macs, run_cli

# --- the job API ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("svc"), tokens="alice:s1", workers=1)
    with TestClient(create_app(settings)) as c:
        yield c


AUTH = {"Authorization": "Bearer s1"}


def _job(c: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    r = c.post("/v1/jobs", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job: dict[str, Any] = c.get(f"/v1/jobs/{r.json()['id']}", headers=AUTH).json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError("job did not finish")


def test_jobs_take_an_input_shape(service: TestClient, exported: dict[str, Path]) -> None:
    path = exported["crnn"]
    with path.open("rb") as f:
        ckpt = service.post("/v1/checkpoints", files={"file": ("m.onnx", f)}, headers=AUTH)
    cid = ckpt.json()["id"]
    base = {"checkpoint_id": cid, "methods": ["mrp"]}

    job = _job(service, base)
    assert job["status"] == "done", job
    report = Report.model_validate_json(
        service.get(f"/v1/jobs/{job['id']}/report", headers=AUTH).text
    )
    code, out, _ = run_cli("analyze", str(path), "--methods", "mrp", "--json")
    assert code == 0 and report.to_json() == out.strip()  # note included, same bytes
    assert report.summary.flops is None and len(report.notes) == 1
    graph = service.get(f"/v1/jobs/{job['id']}/layers/conv2/graph", headers=AUTH)
    assert graph.status_code == 200 and graph.json()["n_filters"] == 16, graph.text

    client = PruneGraphClient("http://testserver", token="s1", http=service)
    job_id = client.submit(cid, methods=["mrp"], input_shape=(1, 1, 16, 32))
    client.wait(job_id, timeout=120)
    shaped = client.report(job_id)
    assert shaped.notes == []
    assert shaped.summary.flops == reference_macs(model_of("crnn"), (1, 1, 16, 32))

    job = _job(service, {**base, "input_shape": [[1, 1, 16]]})
    assert job["status"] == "failed" and "x [batch, 1, 16, width]" in job["error"]
    for bad in ([[0, 1, 16, 32]], [[1] * 9], "1,1,16,32"):
        r = service.post("/v1/jobs", json={**base, "input_shape": bad}, headers=AUTH)
        assert r.status_code == 422, r.text
    r = service.post(
        "/v1/jobs",
        json={**base, "input_shape": [1, 1, 16, 32],
              "manifest": json.loads(manifest_from_onnx(path, input_shapes=[[1, 1, 16, 32]])
                                     .model_dump_json())},
        headers=AUTH,
    )  # fmt: skip
    assert r.status_code == 422 and "either manifest or input_shape" in r.text


def test_analysis_is_the_library_s_without_a_manifest(exported: dict[str, Path]) -> None:
    """No manifest: the report is the one of the weights alone, plus the note."""
    path = exported["convnet"]
    parsed = read_checkpoint(path)
    plain = analyze(parsed.layers, checkpoint=parsed.info, skipped=parsed.skipped, methods=["l1"])
    code, out, _ = run_cli("analyze", str(path), "--methods", "l1", "--json")
    data = json.loads(out)
    assert code == 0 and data.pop("notes")
    assert data == json.loads(plain.to_json())
