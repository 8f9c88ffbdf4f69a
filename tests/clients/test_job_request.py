"""clients.job_request: the client builds the service's own JobRequest, refuses what the server
would refuse with the server's words, and sends what the server validates into the same request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

import clients.job_request
from clients import InvalidRequestError, PruneGraphClient, build_manifest, capture_activations
from clients.job_request import (
    data_aware_options,
    has_feature_maps,
    job_request,
    multipart_body,
    wire_body,
)
from graphs.contracts.jobs import JobRequest
from graphs.options import AnalysisOptions
from graphs.plan import Constraints
from service.main import create_app
from service.settings import Settings
from tests.clients import models

CKPT = "0" * 64
BASICS: dict[str, Any] = {"methods": ["mrp"], "seed": 0, "target": None, "plan_method": "mrp"}


@pytest.fixture(scope="module")
def tc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("job-request"), workers=1)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.mark.parametrize(
    "fields",
    [
        {"target": {"flops": 0.5, "params": 0.5}},
        {"target": {"flops": 1.5}},
        {"step": 1.5},
        {"methods": ["nope"]},
        {"methods": ["ci"]},
        {"options": {"alpha": 2}},
        {"options": {"unknown": 1}},
        {"constraints": {"min_channels": 0}},
        {"plan_method": "magic", "target": {"flops": 0.5}},
        {"input_shape": [[1, 0, 8]]},
        {"allocation": "greedy", "target": {"flops": 0.5}},
        {"manifest": {"input_shapes": []}},
    ],
)
def test_a_bad_request_is_refused_as_the_server_refuses_it(
    tc: TestClient, fields: dict[str, Any]
) -> None:
    raw = {"checkpoint_id": CKPT, **BASICS, **fields}
    answer = tc.post("/v1/jobs", json=raw)
    assert answer.status_code == 422
    with pytest.raises(InvalidRequestError) as refused:
        job_request(**{"checkpoint_id": CKPT, **BASICS, **fields})
    error = refused.value
    assert (error.status_code, error.error, error.hint) == (
        422,
        answer.json()["error"],
        answer.json()["hint"],
    )


def requests() -> Iterator[dict[str, Any]]:
    """Keyword sets of submit(): models and plain mappings, every optional field."""
    torch.manual_seed(0)
    manifest = build_manifest(models.digit_cnn(), torch.zeros(1, 1, 28, 28))
    yield {}
    yield {"methods": ("l1", "mrp"), "seed": 7, "target": {"flops": 0.5}, "plan_method": "l1"}
    yield {"manifest": manifest, "options": AnalysisOptions(alpha=0.2), "step": 1}
    yield {"manifest": manifest.model_dump(mode="json"), "options": {"min_explained": 0.3}}
    yield {"constraints": Constraints(round_to=4), "target": {"params": 0.3}, "step": 0.1}
    yield {"constraints": {"round_to": 8}, "target": {"params": 0.3}}
    yield {"activations_id": "a1", "compensation": False, "allocation": "uniform", "epsilon": 0.01}
    yield {"compensation": True, "input_shape": (1, 3, 64, 256)}
    yield {"input_shape": [[1, 3, 64, 256], (2, 5)], "options": {"vectors": "weights"}}


def arguments(given: dict[str, Any]) -> dict[str, Any]:
    defaults = {"methods": ("mrp", "l1"), "seed": 0, "target": None, "plan_method": "mrp"}
    return {"checkpoint_id": CKPT, **defaults, **given}


@pytest.mark.parametrize("given", list(requests()))
def test_the_server_reads_what_is_sent_as_the_same_request(given: dict[str, Any]) -> None:
    request = job_request(**arguments(given))
    body = wire_body(request)
    received = JobRequest.model_validate_json(json.dumps(body))  # what the service does
    assert received == request
    assert received.model_dump_json() == request.model_dump_json()  # what it stores
    sent = {"checkpoint_id", "methods", "seed", "target", "plan_method", *given}
    assert set(body) <= sent  # the server's defaults apply to the rest
    for name in ("options", "constraints"):  # nested too: only what the caller gave
        value = given.get(name)
        if value is not None:
            keys = value.model_fields_set if hasattr(value, "model_fields_set") else set(value)
            assert set(body[name]) == keys


def test_a_bad_request_is_refused_before_anything_is_uploaded() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(500)

    http = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://x")
    client = PruneGraphClient("http://x", http=http, retries=1)
    with pytest.raises(InvalidRequestError) as e:
        client.plan_for(b"not even read", target={"flops": 1.5})
    assert "target" in e.value.error
    with pytest.raises(InvalidRequestError):
        client.analyze(b"not even read", options={"alpha": 2})
    assert seen == []  # nothing was sent: no upload, no job


def test_a_large_manifest_goes_as_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    manifest = build_manifest(models.digit_cnn(), torch.zeros(1, 1, 28, 28))
    body = wire_body(job_request(**arguments({"manifest": manifest})))
    assert multipart_body(body) is None  # small enough for JSON
    assert multipart_body(wire_body(job_request(**arguments({})))) is None
    monkeypatch.setattr(clients.job_request, "MANIFEST_AS_FILE", 100)
    files = multipart_body(body)
    assert files is not None and set(files) == {"request", "manifest"}
    request = json.loads(files["request"][1])
    assert "manifest" not in request and files["manifest"][0] == "manifest.json"
    assert {**request, "manifest": json.loads(files["manifest"][1])} == body


def test_feature_maps_are_told_from_the_capture_or_the_file_header(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.digit_cnn()
    batch = [torch.randn(4, 1, 28, 28)]
    maps = capture_activations(model, batch, max_samples=4)
    stats = capture_activations(model, batch, max_samples=4, maps=False)
    assert has_feature_maps(maps) and not has_feature_maps(stats) and not has_feature_maps(None)
    assert has_feature_maps(maps.save(tmp_path / "maps.safetensors"))
    assert not has_feature_maps(str(stats.save(tmp_path / "stats.safetensors")))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    assert has_feature_maps(junk)  # cannot tell: sent as maps, the server says what is wrong


def test_options_become_data_aware_unless_vectors_were_chosen() -> None:
    assert data_aware_options(None, True) == {"vectors": "activations"}
    assert data_aware_options({"k": 3}, False) == {"k": 3}
    assert data_aware_options({"vectors": "weights"}, True) == {"vectors": "weights"}
    chosen = AnalysisOptions(vectors="weights")
    assert data_aware_options(chosen, True) is chosen
    aware = data_aware_options(AnalysisOptions(alpha=0.1), True)
    assert aware == AnalysisOptions(alpha=0.1, vectors="activations")
