"""clients.PruneGraphClient against the real app in-process (TestClient), and transport mocks."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

import clients.http
from clients import (
    AuthenticationError,
    ConnectionFailedError,
    InvalidRequestError,
    JobFailedError,
    JobStatus,
    JobTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
    PruneGraphClient,
    PruneGraphHTTPError,
    ServerError,
)
from graphs.plan import PruningPlan
from graphs.report import Report
from service.main import create_app
from service.settings import Settings
from service.store.db import CheckpointRow
from tests.clients import models

BASE = "http://testserver"
LIMIT = 4_000_000  # bytes; the digit CNN checkpoint is about 1.6 MB


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("http-client")


@pytest.fixture(scope="module")
def tc(data_dir: Path) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=data_dir,
        tokens="alice:secret1,bob:secret2",
        workers=2,
        max_upload_bytes=LIMIT,
    )
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def alice(tc: TestClient) -> PruneGraphClient:
    return PruneGraphClient(BASE, token="secret1", http=tc)


@pytest.fixture(scope="module")
def bob(tc: TestClient) -> PruneGraphClient:
    return PruneGraphClient(BASE, token="secret2", http=tc)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "digit_cnn.pt"
    torch.save(models.digit_cnn().state_dict(), path)
    return path


def test_analyze_end_to_end_is_deterministic(alice: PruneGraphClient, checkpoint: Path) -> None:
    first = alice.analyze(checkpoint, methods=("mrp", "l1"), seed=3, progress=True)
    assert isinstance(first, Report)
    assert first.methods == ["mrp", "l1"]
    assert first.checkpoint.sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    second = alice.analyze(checkpoint.read_bytes(), methods=("l1", "mrp"), seed=3)
    assert second.to_json() == first.to_json()


def test_plan_for_reaches_the_target(alice: PruneGraphClient, checkpoint: Path) -> None:
    plan = alice.plan_for(checkpoint, target={"params": 0.3}, method="l1")
    assert isinstance(plan, PruningPlan)
    assert plan.achieved["params"] >= 0.3 and plan.params_after < plan.params_before


def test_plan_model_sends_the_manifest(alice: PruneGraphClient) -> None:
    torch.manual_seed(1)
    model = models.digit_cnn()
    plan = alice.plan(model, torch.zeros(1, 1, 28, 28), target_flops=0.3, method="l1")
    assert plan.coupling == "manifest" and plan.flops_after is not None
    assert plan.achieved["flops"] >= 0.3


def test_job_status_and_missing_plan(alice: PruneGraphClient, checkpoint: Path) -> None:
    job_id = alice.submit(alice.upload(checkpoint), methods=["l1"])
    status = alice.wait(job_id, poll=0.05)
    assert status == JobStatus(id=job_id, status="done", progress=1.0, error=None)
    with pytest.raises(NotFoundError, match="without a target") as info:
        alice.plan(job_id)
    assert info.value.hint


def test_bad_upload_and_bad_request(alice: PruneGraphClient, checkpoint: Path) -> None:
    with pytest.raises(InvalidRequestError) as info:
        alice.upload(os.urandom(4096))
    assert 400 <= info.value.status_code < 500 and info.value.error and info.value.hint
    with pytest.raises(PayloadTooLargeError, match="PRUNEGRAPH_MAX_UPLOAD_BYTES"):
        alice.upload(os.urandom(LIMIT + 100_000))
    ckpt = alice.upload(checkpoint)
    with pytest.raises(InvalidRequestError, match="exactly one") as bad:
        alice.submit(ckpt, target={"flops": 0.5, "params": 0.5})
    assert bad.value.status_code == 422


def test_unknown_ids(alice: PruneGraphClient) -> None:
    with pytest.raises(NotFoundError) as info:
        alice.job("no-such-job")
    assert info.value.status_code == 404 and "no-such-job" in info.value.error
    with pytest.raises(NotFoundError):
        alice.submit("0" * 64)


def test_auth_and_isolation(
    tc: TestClient, bob: PruneGraphClient, alice: PruneGraphClient, checkpoint: Path
) -> None:
    anonymous = PruneGraphClient(BASE, http=tc)
    with pytest.raises(AuthenticationError) as info:
        anonymous.upload(checkpoint)
    assert info.value.status_code == 401 and "Bearer" in info.value.hint
    with pytest.raises(AuthenticationError):
        PruneGraphClient(BASE, token="wrong", http=tc).job("x")
    job_id = bob.submit(bob.upload(checkpoint), methods=["l1"])
    with pytest.raises(NotFoundError):
        alice.job(job_id)
    with pytest.raises(NotFoundError):
        alice.report(job_id)
    assert bob.wait(job_id, poll=0.05).status == "done"


def test_failed_job_raises_with_the_reason(
    tc: TestClient, alice: PruneGraphClient, data_dir: Path, tmp_path: Path
) -> None:
    # A NaN-only checkpoint is refused at upload, so it is placed directly (as in test_app).
    path = tmp_path / "nan.pt"
    torch.save({"fc.weight": torch.full((8, 4), float("nan"))}, path)
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    (data_dir / "checkpoints" / sha).write_bytes(data)
    with tc.app.state.pg.sessions.begin() as s:  # type: ignore[attr-defined]
        s.merge(
            CheckpointRow(
                id=sha,
                owner="alice",
                format="pytorch",
                size_bytes=len(data),
                n_layers=1,
                skipped_json="[]",
            )
        )
    job_id = alice.submit(sha, methods=["mrp"])
    with pytest.raises(JobFailedError, match="NaN") as info:
        alice.wait(job_id, poll=0.05)
    assert info.value.job_id == job_id and "NaN" in info.value.reason
    with pytest.raises(InvalidRequestError, match="failed"):
        alice.report(job_id)


# ---- transport mocks ----------------------------------------------------------------------------


def _mock(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


def _job(status: str = "done", progress: float = 1.0) -> dict[str, Any]:
    return {"id": "j1", "status": status, "progress": progress, "error": None, "extra": 1}


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clients.http, "_BACKOFF_S", 0.0)


def test_connection_errors_are_retried() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) <= 2:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json=_job())

    client = PruneGraphClient("http://svc:1/", token="t", http=_mock(handler), retries=3)
    assert client.job("j1") == JobStatus(id="j1", status="done", progress=1.0)
    assert len(calls) == 3
    assert str(calls[-1].url) == "http://svc:1/v1/jobs/j1"
    assert calls[-1].headers["authorization"] == "Bearer t"


def test_connection_failure_after_all_attempts() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectTimeout("timed out", request=request)

    client = PruneGraphClient("http://svc:1", http=_mock(handler), retries=4)
    with client, pytest.raises(ConnectionFailedError, match="after 4 attempts"):
        client.upload(b"weights")
    assert len(calls) == 4


def test_server_errors_and_timeouts_are_not_retried() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if request.url.path.endswith("/boom"):
            return httpx.Response(503, text="upstream down")
        return httpx.Response(200, json=_job("running", 0.25))

    client = PruneGraphClient("http://svc:1", http=_mock(handler))
    with pytest.raises(ServerError, match="upstream down") as info:
        client.job("boom")
    assert isinstance(info.value, PruneGraphHTTPError) and info.value.status_code == 503
    assert len(calls) == 1
    with pytest.raises(JobTimeoutError, match="running") as timeout:
        client.wait("j1", timeout=0.05, poll=0.01)
    assert isinstance(timeout.value, TimeoutError) and timeout.value.last.progress == 0.25


def test_retries_must_be_positive() -> None:
    with pytest.raises(ValueError, match="retries"):
        PruneGraphClient(retries=0)


def test_analyze_a_live_model_with_its_manifest(alice: PruneGraphClient) -> None:
    torch.manual_seed(2)
    model = models.digit_cnn()
    report = alice.analyze(
        model, torch.zeros(1, 1, 28, 28), methods=["mrp"], options={"min_explained": 0.3}
    )
    assert report.summary.flops is not None  # the manifest went with the job
    assert report.parameters["mrp"]["min_explained"] == 0.3
    plain = alice.analyze(model, methods=["mrp"])  # the state dict alone
    assert plain.summary.flops is None and plain.checkpoint.sha256 == report.checkpoint.sha256
    with pytest.raises(TypeError, match="live model"):
        alice.analyze(b"bytes", torch.zeros(1, 1, 28, 28))


def test_plan_a_live_model_with_constraints(alice: PruneGraphClient) -> None:
    torch.manual_seed(3)
    model = models.digit_cnn()
    x = torch.zeros(1, 1, 28, 28)
    plan = alice.plan(
        model, x, target_params=0.4, method="mrp", constraints={"round_to": 4}, step=1
    )
    assert plan.constraints.round_to == 4 and plan.parameters["step"] == 1
    assert all(g.channels_after % 4 == 0 for g in plan.groups if g.remove)
    with pytest.raises(ValueError, match="exactly one"):
        alice.plan(model, x)
    with pytest.raises(InvalidRequestError, match="step"):
        alice.plan(model, x, target_params=0.4, step=1.5)
