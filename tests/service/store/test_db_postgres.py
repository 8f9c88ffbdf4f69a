"""The service on a real PostgreSQL: the API tests of test_app on it, and two `prunegraph serve`
replicas sharing one database where one is killed -9 mid-job and the other finishes its jobs.

The server comes from ``PRUNEGRAPH_TEST_POSTGRES_URL`` (``.ci/run`` starts a throwaway cluster
and sets it) or, without it, from a throwaway cluster started here (:mod:`tests.postgres`); every
use gets a fresh database. Where PostgreSQL is not installed the tests skip, saying so; where the
variable is set but its server does not answer they fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from graphs.report import Report
from service.main import create_app
from tests.postgres import ENV, Cluster, fresh_database
from tests.server_process import Server, wait_job
from tests.service.api import test_routes as api
from tests.service.helpers import app_settings

# The API tests of test_app, run again here with this module's `client` (in test_app's order:
# they share one server and see each other's checkpoints).
test_upload_is_content_addressed = api.test_upload_is_content_addressed
test_job_with_target_gives_report_and_plan = api.test_job_with_target_gives_report_and_plan
test_invalid_job_requests = api.test_invalid_job_requests
test_failing_job_is_recorded_and_others_still_run = (
    api.test_failing_job_is_recorded_and_others_still_run
)
test_auth_and_isolation = api.test_auth_and_isolation
test_delete_checkpoint_removes_file_and_jobs = api.test_delete_checkpoint_removes_file_and_jobs


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[str]:
    """A SQLAlchemy URL to a PostgreSQL server's ``postgres`` database (to create others in)."""
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install -e '.[dev]'")
    url = os.environ.get(ENV)
    if url:
        import sqlalchemy as sa

        engine = sa.create_engine(url)
        try:
            with engine.connect():
                pass
        except sa.exc.OperationalError as e:
            pytest.fail(f"{ENV} is set but its server does not answer: {e}")
        finally:
            engine.dispose()
        yield url
        return
    cluster = Cluster()
    try:
        url = cluster.start()
    except RuntimeError as e:
        pytest.skip(f"no PostgreSQL to test against ({e}); .ci/run installs and starts one")
    try:
        yield url
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service-pg")


@pytest.fixture(scope="module")
def client(data_dir: Path, pg_admin: str) -> Iterator[TestClient]:
    cfg = app_settings(data_dir, max_upload_bytes=1_000_000, database_url=fresh_database(pg_admin))
    with TestClient(create_app(cfg)) as c:
        yield c


def test_the_api_tests_above_ran_on_postgres(client: TestClient) -> None:
    assert client.app.state.pg.engine.dialect.name == "postgresql"  # type: ignore[attr-defined]


@pytest.mark.real
@pytest.mark.slow
def test_two_replicas_one_killed_mid_job_the_other_finishes(
    tmp_path: Path, pg_admin: str, realdata: Path
) -> None:
    """Replicas A and B on one database and one data dir: A holds a running job and a queued
    one; A is killed -9 (with its workers); B takes both over once their leases expire."""
    env = {"PRUNEGRAPH_DATABASE_URL": fresh_database(pg_admin), "PRUNEGRAPH_JOB_LEASE_S": "2"}
    data = tmp_path / "data"
    a, b = Server(data, env=env), Server(data, env=env)
    try:
        a.start()
        b.start()
        with (realdata / "mobilenet_v2_imagenet.pth").open("rb") as f:
            up = httpx.post(f"{a.url}/v1/checkpoints", files={"file": f}, timeout=120)
        assert up.status_code == 201, up.text
        ckpt = up.json()["id"]
        slow = {"checkpoint_id": ckpt, "methods": ["mrp", "hsc", "l1"], "seed": 0,
                "target": {"params": 0.3}}  # fmt: skip
        quick = {"checkpoint_id": ckpt, "methods": ["l1"], "seed": 1}
        running = httpx.post(f"{a.url}/v1/jobs", json=slow, timeout=30).json()["id"]
        queued = httpx.post(f"{a.url}/v1/jobs", json=quick, timeout=30).json()["id"]
        at_kill = wait_job(a.url, running, {"running", "done"}, timeout=60)
        a.kill()
        assert at_kill["status"] == "running", "the job ended before the kill: nothing was tested"
        for job in (running, queued):  # both finish on B, which was never restarted
            assert wait_job(b.url, job, {"done", "failed"}, timeout=240)["status"] == "done"
        report = Report.model_validate_json(httpx.get(f"{b.url}/v1/jobs/{running}/report").text)
        assert report.checkpoint.sha256 == ckpt and report.summary.n_layers == 36
        assert httpx.get(f"{b.url}/v1/jobs/{running}/plan").status_code == 200
        listed = httpx.get(f"{b.url}/v1/jobs", timeout=30).json()["items"]
        assert {j["id"] for j in listed} == {running, queued}
    finally:
        a.kill()
        b.kill()
