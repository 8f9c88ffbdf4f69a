"""`prunegraph serve` as a real process on 127.0.0.1: kill -9 mid-job, restart, nothing lost."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from graphs.report import Report
from tests.server_process import Server, wait_job

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "data", env={"PRUNEGRAPH_JOB_LEASE_S": "2"})
    try:
        yield s
    finally:
        s.kill()


def test_kill_9_mid_job_then_restart_loses_nothing(server: Server, realdata: Path) -> None:
    server.start()
    with (realdata / "mobilenet_v2_imagenet.pth").open("rb") as f:
        up = httpx.post(f"{server.url}/v1/checkpoints", files={"file": f}, timeout=120)
    assert up.status_code == 201, up.text
    ckpt = up.json()["id"]
    req = {"checkpoint_id": ckpt, "methods": ["l1"], "seed": 0, "target": None}
    first = httpx.post(f"{server.url}/v1/jobs", json=req, timeout=30).json()["id"]
    assert wait_job(server.url, first, {"done", "failed"})["status"] == "done"
    # a long job: every method; kill the server while it runs
    req = {**req, "methods": ["mrp", "srr", "hsc", "l1", "fpgm"], "target": {"params": 0.3}}
    job = httpx.post(f"{server.url}/v1/jobs", json=req, timeout=30).json()["id"]
    at_kill = wait_job(server.url, job, {"running", "done"}, timeout=60)
    server.kill()
    assert at_kill["status"] == "running", "the job ended before the kill: nothing was tested"
    server.start()  # same data dir and database: the job is re-run once its lease (2 s) expires
    done = wait_job(server.url, job, {"done", "failed"})
    assert done["status"] == "done", done
    report = Report.model_validate_json(httpx.get(f"{server.url}/v1/jobs/{job}/report").text)
    assert report.checkpoint.sha256 == ckpt and report.summary.n_layers == 36
    assert httpx.get(f"{server.url}/v1/jobs/{job}/plan").status_code == 200
    # the job finished before the kill is still there, with its report
    assert httpx.get(f"{server.url}/v1/jobs/{first}/report").status_code == 200


def test_twenty_concurrent_clients_and_hostile_uploads(server: Server, realdata: Path) -> None:
    """20 clients at once upload real checkpoints and analyse them; hostile uploads in between
    get 4xx, never run, and the server keeps serving everyone."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    server.start()
    names = ["digit_cnn.pth", "mtcnn_pnet.pt", "mtcnn_rnet.pt", "mtcnn_onet.pt"]
    sentinel = server.data_dir.parent / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {sentinel}",))

    def client(i: int) -> str:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            if i % 5 == 4:  # every fifth client is hostile
                bad = pickle.dumps({"w": Evil()}) if i % 10 == 4 else os.urandom(2048)
                r = c.post("/v1/checkpoints", files={"file": ("x.pt", bad)})
                assert 400 <= r.status_code < 500, r.text
                assert {"error", "hint"} <= set(r.json())
                return "refused"
            with (realdata / names[i % 4]).open("rb") as f:
                ckpt = c.post("/v1/checkpoints", files={"file": f}).json()["id"]
            req = {"checkpoint_id": ckpt, "methods": ["mrp", "l1"], "seed": i, "target": None}
            job = c.post("/v1/jobs", json=req).json()["id"]
            body = wait_job(server.url, job, {"done", "failed"}, timeout=180)
            assert body["status"] == "done", body
            Report.model_validate_json(c.get(f"/v1/jobs/{job}/report").text)
            return "done"

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(client, range(20)))
    assert results.count("done") == 16 and results.count("refused") == 4
    assert not sentinel.exists(), "a hostile payload ran"
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
