"""clients.PruneGraphClient against the real app in-process (TestClient)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from clients import (
    AuthenticationError,
    InvalidRequestError,
    JobFailedError,
    NotFoundError,
    PayloadTooLargeError,
    PruneGraphClient,
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
    assert (status.id, status.status, status.progress, status.error) == (job_id, "done", 1.0, None)
    assert (
        status.finished and not status.has_plan and status.checkpoint_id == alice.upload(checkpoint)
    )
    assert alice.job(job_id) == status  # a finished job does not change
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
