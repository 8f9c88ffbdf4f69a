"""The HTTP service end to end: TestClient with the lifespan (real worker processes, SQLite)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import update

from graphs.plan import PruningPlan
from graphs.report import Report
from service.main import create_app
from service.store.db import RUNNING, CheckpointRow, JobRow, init_db
from tests.service.helpers import ALICE, BOB, app_settings, model_bytes, wait_for_job


def _nan_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"fc.weight": torch.full((8, 4), float("nan"))}, buf)
    return buf.getvalue()


def _upload(c: TestClient, data: bytes, headers: dict[str, str] = ALICE) -> Any:
    return c.post("/v1/checkpoints", files={"file": ("model.pt", data)}, headers=headers)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="module")
def client(data_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(data_dir, max_upload_bytes=1_000_000))) as c:
        yield c


def test_healthz_needs_no_token_docs_do(client: TestClient) -> None:
    """With tokens set, the API description is for callers with a token (service.api.apidocs)."""
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/openapi.json").status_code == 401
    assert client.get("/docs", follow_redirects=False).status_code == 303  # to /login
    assert "/v1/jobs" in client.get("/openapi.json", headers=ALICE).json()["paths"]


def test_upload_is_content_addressed(client: TestClient, data_dir: Path) -> None:
    data = model_bytes()
    first = _upload(client, data)
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["id"] == hashlib.sha256(data).hexdigest()
    assert body["format"] == "pytorch" and body["size_bytes"] == len(data)
    assert body["n_layers"] == 4 and isinstance(body["skipped"], list)
    second = _upload(client, data)
    assert second.status_code == 201 and second.json()["id"] == body["id"]
    assert [p.name for p in (data_dir / "checkpoints").iterdir()] == [body["id"]]
    assert list((data_dir / "tmp").iterdir()) == []


def test_oversized_upload_is_413(client: TestClient, data_dir: Path) -> None:
    r = _upload(client, os.urandom(1_200_000))
    assert r.status_code == 413
    assert r.json()["error"] and "PRUNEGRAPH_MAX_UPLOAD_BYTES" in r.json()["hint"]
    assert list((data_dir / "tmp").iterdir()) == []


class _Evil:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.sentinel),))


def test_bad_and_hostile_files_are_refused(
    client: TestClient, data_dir: Path, tmp_path: Path
) -> None:
    sentinel = tmp_path / "pwned"
    evil = io.BytesIO()
    torch.save({"weight": _Evil(sentinel)}, evil)
    for data in (os.urandom(4096), pickle.dumps(_Evil(sentinel)), evil.getvalue(), b""):
        r = _upload(client, data)
        assert 400 <= r.status_code < 500, r.text
        assert set(r.json()) == {"error", "hint"} and r.json()["hint"]
    assert not sentinel.exists()
    assert list((data_dir / "tmp").iterdir()) == []
    assert _upload(client, _nan_bytes()).status_code == 422  # nothing to analyse
    assert not _upload(client, b"", headers=BOB).is_success


def test_job_with_target_gives_report_and_plan(client: TestClient) -> None:
    ckpt = _upload(client, model_bytes()).json()["id"]
    r = client.post(
        "/v1/jobs",
        json={"checkpoint_id": ckpt, "methods": ["mrp", "l1"], "target": {"params": 0.3}},
        headers=ALICE,
    )
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "queued"
    job = wait_for_job(client, r.json()["id"])
    assert job["status"] == "done", job
    assert job["progress"] == 1.0 and job["error"] is None
    report = Report.model_validate_json(
        client.get(f"/v1/jobs/{job['id']}/report", headers=ALICE).text
    )
    assert report.methods == ["mrp", "l1"] and report.checkpoint.sha256 == ckpt
    plan = PruningPlan.model_validate_json(
        client.get(f"/v1/jobs/{job['id']}/plan", headers=ALICE).text
    )
    assert plan.checkpoint_sha256 == ckpt and plan.params_after < plan.params_before
    assert job["id"] in [j["id"] for j in client.get("/v1/jobs", headers=ALICE).json()["items"]]


def test_job_without_target_has_no_plan(client: TestClient) -> None:
    ckpt = _upload(client, model_bytes()).json()["id"]
    r = client.post("/v1/jobs", json={"checkpoint_id": ckpt, "methods": ["l1"]}, headers=ALICE)
    job = wait_for_job(client, r.json()["id"])
    assert job["status"] == "done"
    plan = client.get(f"/v1/jobs/{job['id']}/plan", headers=ALICE)
    assert plan.status_code == 404 and "without a target" in plan.json()["error"]


def test_invalid_job_requests(client: TestClient) -> None:
    ckpt = _upload(client, model_bytes()).json()["id"]
    for body in (
        {"checkpoint_id": ckpt, "methods": ["nope"]},
        {"checkpoint_id": ckpt, "target": {"flops": 0.5, "params": 0.5}},
        {"checkpoint_id": ckpt, "plan_method": "magic"},
    ):
        r = client.post("/v1/jobs", json=body, headers=ALICE)
        assert r.status_code == 422 and set(r.json()) == {"error", "hint"}, r.text
    r = client.post("/v1/jobs", json={"checkpoint_id": "0" * 64}, headers=ALICE)
    assert r.status_code == 404


def _plant(client: TestClient, data_dir: Path, data: bytes, owner: str) -> str:
    """Store a checkpoint bypassing upload validation (as if the ingest rules had changed)."""
    sha = hashlib.sha256(data).hexdigest()
    (data_dir / "checkpoints" / sha).write_bytes(data)
    with client.app.state.pg.sessions.begin() as s:  # type: ignore[attr-defined]
        s.merge(
            CheckpointRow(
                id=sha,
                owner=owner,
                format="pytorch",
                size_bytes=len(data),
                n_layers=1,
                skipped_json="[]",
            )
        )
    return sha


def test_failing_job_is_recorded_and_others_still_run(client: TestClient, data_dir: Path) -> None:
    bad = _plant(client, data_dir, _nan_bytes(), "alice")
    r = client.post("/v1/jobs", json={"checkpoint_id": bad, "methods": ["mrp"]}, headers=ALICE)
    job = wait_for_job(client, r.json()["id"])
    assert job["status"] == "failed" and "NaN" in job["error"], job
    report = client.get(f"/v1/jobs/{job['id']}/report", headers=ALICE)
    assert report.status_code == 422 and "NaN" in report.json()["error"]
    good = _upload(client, model_bytes()).json()["id"]
    r = client.post("/v1/jobs", json={"checkpoint_id": good, "methods": ["l1"]}, headers=ALICE)
    assert wait_for_job(client, r.json()["id"])["status"] == "done"


def test_auth_and_isolation(client: TestClient) -> None:
    assert client.get("/v1/jobs").status_code == 401
    r = client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "Bearer" in r.json()["hint"]
    assert _upload(client, model_bytes(), headers={}).status_code == 401
    ckpt = _upload(client, model_bytes(1), headers=BOB).json()["id"]
    job = client.post("/v1/jobs", json={"checkpoint_id": ckpt, "methods": ["l1"]}, headers=BOB)
    job_id = job.json()["id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=ALICE).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/report", headers=ALICE).status_code == 404
    assert job_id not in [j["id"] for j in client.get("/v1/jobs", headers=ALICE).json()["items"]]
    alice_job = client.post("/v1/jobs", json={"checkpoint_id": ckpt}, headers=ALICE)
    assert alice_job.status_code == 404  # alice never uploaded bob's checkpoint
    assert wait_for_job(client, job_id, BOB)["status"] == "done"


def test_delete_checkpoint_removes_file_and_jobs(client: TestClient, data_dir: Path) -> None:
    ckpt = _upload(client, model_bytes(2), headers=BOB).json()["id"]
    job_id = client.post(
        "/v1/jobs", json={"checkpoint_id": ckpt, "methods": ["l1"]}, headers=BOB
    ).json()["id"]
    wait_for_job(client, job_id, BOB)
    assert client.delete(f"/v1/checkpoints/{ckpt}", headers=ALICE).status_code == 404
    assert client.delete(f"/v1/checkpoints/{ckpt}", headers=BOB).status_code == 204
    assert not (data_dir / "checkpoints" / ckpt).exists()
    assert client.get(f"/v1/jobs/{job_id}", headers=BOB).status_code == 404


def test_restart_requeues_unfinished_jobs(tmp_path: Path) -> None:
    settings = app_settings(tmp_path, workers=1)
    with TestClient(create_app(settings)) as c:
        ckpt = _upload(c, model_bytes()).json()["id"]
    _, sessions = init_db(settings.db_url())
    with sessions.begin() as s:
        s.add(
            JobRow(
                id="left-running",
                owner="alice",
                checkpoint_id=ckpt,
                status=RUNNING,
                progress=0.5,
                request_json=f'{{"checkpoint_id": "{ckpt}", "methods": ["l1"]}}',
            )
        )
    with TestClient(create_app(settings)) as c:
        job = wait_for_job(c, "left-running")
        assert job["status"] == "done", job


def test_replanning_reuses_the_cached_analysis(client: TestClient, data_dir: Path) -> None:
    """A second job on the same checkpoint, parameters and seed but another target computes
    nothing again (every per-group artifact is a cache hit), and its plan is the one computed
    from scratch without any cache."""
    from graphs.planner import plan_layers
    from service.ingest.checkpoint import read_checkpoint

    data = model_bytes(seed=7)
    ckpt = _upload(client, data).json()["id"]
    opts = {"alpha": 0.05, "min_explained": 0.4}
    jobs = []
    for ratio in (0.2, 0.4):
        body = {
            "checkpoint_id": ckpt,
            "methods": ["mrp", "hsc"],
            "seed": 5,
            "target": {"params": ratio},
            "plan_method": "mrp",
            "options": opts,
            "constraints": {"min_channels": 2},
            "step": 2,
        }
        jobs.append(
            wait_for_job(client, client.post("/v1/jobs", json=body, headers=ALICE).json()["id"])
        )
    first, second = jobs
    assert first["status"] == second["status"] == "done"
    assert first["cache_misses"] > 0
    assert second["cache_misses"] == 0 and second["cache_hits"] > 0
    assert any((data_dir / "cache").rglob("*"))
    path = data_dir / "model.pt"
    path.write_bytes(data)
    parsed = read_checkpoint(path)
    from graphs.options import AnalysisOptions
    from graphs.plan import Constraints, Target

    expected = plan_layers(
        parsed.layers,
        method="mrp",
        target=Target(params=0.4),
        params_total=parsed.info.n_params,
        options=AnalysisOptions(**opts),
        constraints=Constraints(min_channels=2),
        step=2,
        seed=5,
        checkpoint_sha256=ckpt,
    )
    got = client.get(f"/v1/jobs/{second['id']}/plan", headers=ALICE).text
    assert got == expected.to_json()
    report = Report.model_validate_json(
        client.get(f"/v1/jobs/{second['id']}/report", headers=ALICE).text
    )
    assert report.parameters["mrp"]["min_explained"] == 0.4


def test_a_live_replicas_jobs_are_left_alone_until_its_lease_expires(tmp_path: Path) -> None:
    """Replicas share the database: a starting replica takes over only jobs whose lease ran out
    (their replica died), never those another replica still renews."""
    settings = app_settings(tmp_path, workers=1, job_lease_s=1.0)
    with TestClient(create_app(settings)) as c:
        ckpt = _upload(c, model_bytes()).json()["id"]
    _, sessions = init_db(settings.db_url())
    request = f'{{"checkpoint_id": "{ckpt}", "methods": ["l1"]}}'
    with sessions.begin() as s:
        for job_id, lease in (("alive", time.time() + 5.0), ("dead", time.time() - 1.0)):
            s.add(
                JobRow(
                    id=job_id, owner="alice", checkpoint_id=ckpt, status=RUNNING, progress=0.5,
                    request_json=request, runner="other-replica", lease_until=lease,
                )
            )  # fmt: skip
    stop = threading.Event()

    def other_replica() -> None:  # alive: renews its job's lease, as a live replica does
        while not stop.wait(0.2):
            with sessions.begin() as s:
                s.execute(
                    update(JobRow)
                    .where(JobRow.id == "alive", JobRow.runner == "other-replica")
                    .values(lease_until=time.time() + 3.0)
                )

    renewer = threading.Thread(target=other_replica, daemon=True)
    renewer.start()
    try:
        with TestClient(create_app(settings)) as c:
            assert wait_for_job(c, "dead")["status"] == "done"
            with sessions() as s:
                alive = s.get(JobRow, "alive")
                assert alive is not None and alive.status == RUNNING
                assert alive.runner == "other-replica"  # not touched while its lease holds
            stop.set()  # the other replica dies
            renewer.join()
            assert wait_for_job(c, "alive")["status"] == "done"  # taken over once it expired
            with sessions() as s:
                row = s.get(JobRow, "alive")
                assert row is not None and row.runner != "other-replica"
    finally:
        stop.set()


def test_a_database_of_the_first_version_is_upgraded(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "prunegraph.db"
    with sqlite3.connect(db) as conn:  # the jobs table as the first version created it
        conn.execute(
            "CREATE TABLE jobs (id VARCHAR(32) PRIMARY KEY, owner VARCHAR(200), "
            "checkpoint_id VARCHAR(64), request_json TEXT, status VARCHAR(16), progress FLOAT, "
            "error TEXT, report_json TEXT, plan_json TEXT, created_at FLOAT, updated_at FLOAT)"
        )
        conn.execute(
            "INSERT INTO jobs VALUES ('old', 'alice', 'x', '{}', 'done', 1.0, NULL, '{}', NULL, "
            "0.0, 0.0)"
        )
    with TestClient(create_app(app_settings(tmp_path, workers=1))) as c:
        job = c.get("/v1/jobs/old", headers=ALICE).json()
        assert job["status"] == "done" and job["cache_hits"] == 0
