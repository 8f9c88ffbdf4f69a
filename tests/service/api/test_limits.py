"""Bounded requests, pagination, quotas and rate limits, in-process (issue 15 points 2 and 3).

The real-server versions are in ``test_limits_server.py``; here are the details: exact limits,
the clock of the rate limiter stepped by the test, each bad input's status and hint.
"""

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
from torch import nn

from service.main import create_app
from service.settings import Settings
from service.store.db import DONE, RUNNING, JobRow, init_db

ALICE = {"Authorization": "Bearer a-token"}
BOB = {"Authorization": "Bearer b-token"}
CAROL = {"Authorization": "Bearer c-token"}
DAVE = {"Authorization": "Bearer d-token"}
TOKENS = "alice:a-token,bob:b-token,carol:c-token,dave:d-token"
MAX_JSON = 64 * 1024
MAX_UPLOAD = 1_000_000


class Net(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, bias=False)
        self.conv2 = nn.Conv2d(8, 16, 3, bias=False)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def _bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    torch.save(Net(seed).state_dict(), buf)
    return buf.getvalue()


def _upload(c: TestClient, data: bytes, headers: dict[str, str] = ALICE) -> Any:
    return c.post("/v1/checkpoints", files={"file": ("m.pt", data)}, headers=headers)


def _wait(c: TestClient, job_id: str, headers: dict[str, str] = ALICE) -> dict[str, Any]:
    for _ in range(600):  # bounded: 60 s
        job: dict[str, Any] = c.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


def _error(r: Any, status: int, *words: str) -> dict[str, str]:
    assert r.status_code == status, r.text
    body: dict[str, str] = r.json()
    assert set(body) == {"error", "hint"}
    text = f"{body['error']} {body['hint']}"
    for w in words:
        assert w in text, text
    return body


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("limits")


class Clock:
    """The rate limiter's clock: an hour passes at every reading, unless the test freezes it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.frozen = False

    def __call__(self) -> float:
        if not self.frozen:
            self.now += 3600.0
        return self.now


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def client(data_dir: Path, clock: Clock) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=data_dir, tokens=TOKENS, workers=1, max_json_bytes=MAX_JSON,
        max_upload_bytes=MAX_UPLOAD, quota_bytes=2 * len(_bytes(0)) + 100, quota_jobs=2,
        rate_limit=6, auth_failure_limit=3,
    )  # fmt: skip
    with TestClient(create_app(settings, clock=clock)) as c:
        yield c


# ---- bounded bodies ----------------------------------------------------------------------


def test_a_json_body_over_the_limit_is_refused_with_the_way_out(client: TestClient) -> None:
    ckpt = _upload(client, _bytes(0)).json()["id"]
    big = {"checkpoint_id": ckpt, "methods": ["l1"], "manifest": {"pad": "x" * MAX_JSON}}
    body = _error(client.post("/v1/jobs", json=big, headers=ALICE), 413, "manifest", "multipart")
    assert f"{MAX_JSON:,}" in body["error"]
    # the same without Content-Length (chunked): refused once the limit is passed
    raw = json.dumps(big).encode()
    chunks = (raw[i : i + 8192] for i in range(0, len(raw), 8192))
    r = client.post(
        "/v1/jobs", content=chunks, headers={**ALICE, "content-type": "application/json"}
    )
    _error(r, 413, "PRUNEGRAPH_MAX_JSON_BYTES")
    # other non-upload bodies are bounded too (here: the login form)
    _error(client.post("/login", content=b"t" * (MAX_JSON + 1)), 413)


def test_a_large_manifest_goes_as_a_file_and_is_never_echoed(client: TestClient) -> None:
    from clients.manifest import build_manifest

    model = Net(1)
    ckpt = _upload(client, _bytes(1)).json()["id"]
    manifest = build_manifest(model, torch.zeros(1, 3, 8, 8)).model_dump_json()
    request = {"checkpoint_id": ckpt, "methods": ["l1"], "target": {"flops": 0.3}}
    files = {"request": (None, json.dumps(request)), "manifest": ("m.json", manifest)}
    r = client.post("/v1/jobs", files=files, headers=ALICE)
    assert r.status_code == 201, r.text
    job = _wait(client, r.json()["id"])
    assert job["status"] == "done", job
    assert job["has_manifest"] is True and "manifest" not in job["request"]
    assert job["request"]["target"]["flops"] == 0.3 and job["request"]["methods"] == ["l1"]
    assert client.get(f"/v1/jobs/{job['id']}/plan", headers=ALICE).status_code == 200
    # (a FLOPs target is planned only with a manifest: the file really was used)
    plain = client.post("/v1/jobs", json={**request, "target": None}, headers=ALICE).json()
    assert plain["has_manifest"] is False


@pytest.mark.parametrize(
    ("files", "status", "words"),
    [
        ({"manifest": ("m.json", b"{}")}, 422, ("no field 'request'",)),
        ({"request": (None, b"not json")}, 422, ("invalid job request",)),
        ({"request": (None, b"[1, 2]")}, 422, ("not a JSON object",)),
        ({"request": (None, b'{"checkpoint_id": "x", "seed": -1}')}, 422, ("seed",)),
        ({"request": (None, b'{"checkpoint_id": "x"}'), "manifest": ("m.json", b"{")}, 422,
         ("invalid job request",)),
        ({"request": (None, b'{"checkpoint_id": "x", "manifest": {"layers": []}}'),
          "manifest": ("m.json", b"{}")}, 422, ("given twice",)),
        ({"request": (None, b" " * (MAX_JSON + 1))}, 413, ("field 'request'",)),
        ({"request": (None, b"{}"), "manifest": ("m.json", b" " * (MAX_UPLOAD + 1))}, 413, ()),
    ],
    ids=["no-request", "not-json", "not-object", "invalid", "bad-manifest", "twice",
         "request-too-large", "manifest-too-large"],
)  # fmt: skip
def test_bad_multipart_jobs_are_refused(
    client: TestClient, data_dir: Path, files: dict[str, Any], status: int, words: tuple[str]
) -> None:
    _error(client.post("/v1/jobs", files=files, headers=ALICE), status, *words)
    assert not list((data_dir / "tmp").iterdir())


def test_the_whole_multipart_body_is_bounded_not_only_the_file(
    client: TestClient, data_dir: Path
) -> None:
    import httpx

    files = {"padding": (None, b"x" * (MAX_UPLOAD + 100_000)), "file": ("m.pt", _bytes(2))}
    _error(client.post("/v1/checkpoints", files=files, headers=ALICE), 413, "request body")
    assert not list((data_dir / "tmp").iterdir())
    # the same chunked, without Content-Length: counted while it streams
    encoded = httpx.Request("POST", "http://x/", files=files)
    raw, ctype = encoded.read(), encoded.headers["content-type"]
    chunks = (raw[i : i + 65536] for i in range(0, len(raw), 65536))
    r = client.post("/v1/checkpoints", content=chunks, headers={**ALICE, "content-type": ctype})
    _error(r, 413, "request body")
    assert not list((data_dir / "tmp").iterdir())
    # a small extra field is fine
    files = {"note": (None, b"hello"), "file": ("m.pt", _bytes(2))}
    assert client.post("/v1/checkpoints", files=files, headers=BOB).status_code == 201


# ---- pagination --------------------------------------------------------------------------


def test_lists_are_paginated_summaries(client: TestClient, data_dir: Path) -> None:
    _, sessions = init_db(Settings(data_dir=data_dir).db_url())
    request = json.dumps({"checkpoint_id": "c" * 64, "methods": ["l1"], "manifest": {"x": 1}})
    with sessions.begin() as s:
        for i in range(7):  # bob's jobs, two of them at the same time (ties broken by id)
            at = 1000.0 + min(i, 5)
            s.add(JobRow(id=f"job{i}", owner="bob", checkpoint_id="c" * 64, status=DONE,
                         request_json=request, created_at=at, updated_at=at))  # fmt: skip
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params, headers=BOB).json()
        assert len(page["items"]) <= 3
        for item in page["items"]:
            assert "request" not in item and item["methods"] == ["l1"]
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"job{i}" for i in (6, 5, 4, 3, 2, 1, 0)]  # newest first, each once
    assert all(j not in [i["id"] for i in client.get("/v1/jobs", headers=ALICE).json()["items"]]
               for j in seen)  # fmt: skip
    _error(client.get("/v1/jobs", params={"cursor": "nonsense"}, headers=BOB), 400, "cursor")
    for bad in (0, 1001, -1):
        _error(client.get("/v1/jobs", params={"limit": bad}, headers=BOB), 422, "limit")
    # checkpoints: bob has one (from the multipart test or uploaded here)
    _upload(client, _bytes(3), BOB)
    page = client.get("/v1/checkpoints", params={"limit": 1}, headers=BOB).json()
    assert len(page["items"]) == 1 and page["next_cursor"] is not None
    assert set(page["items"][0]) == {"id", "format", "size_bytes", "n_layers", "n_skipped",
                                     "created_at"}  # fmt: skip
    rest = client.get("/v1/checkpoints", params={"cursor": page["next_cursor"]}, headers=BOB)
    ids = [page["items"][0]["id"]] + [c["id"] for c in rest.json()["items"]]
    assert len(ids) == len(set(ids)) >= 2


# ---- quotas -----------------------------------------------------------------------------


def test_the_storage_quota_counts_each_users_bytes(client: TestClient) -> None:
    first, second, third = _bytes(10), _bytes(11), _bytes(12)
    up = _upload(client, first, CAROL)
    assert up.status_code == 201
    assert _upload(client, second, CAROL).status_code == 201
    r = _upload(client, third, CAROL)
    body = _error(r, 429, "quota", "DELETE /v1/checkpoints")
    assert int(r.headers["retry-after"]) > 0 and "PRUNEGRAPH_QUOTA_BYTES" in body["hint"]
    assert _upload(client, second, CAROL).status_code == 201  # the same bytes again: no more
    assert _upload(client, third, DAVE).status_code == 201  # another user's own quota
    assert client.delete(f"/v1/checkpoints/{up.json()['id']}", headers=CAROL).status_code == 204
    assert _upload(client, third, CAROL).status_code == 201  # room again


def test_the_jobs_quota_counts_queued_and_running_jobs(client: TestClient, data_dir: Path) -> None:
    ckpt = _upload(client, _bytes(11), DAVE).json()["id"]
    _, sessions = init_db(Settings(data_dir=data_dir).db_url())
    request = json.dumps({"checkpoint_id": ckpt, "methods": ["l1"]})
    with sessions.begin() as s:  # two jobs another replica runs (a lease far ahead)
        for i in range(2):
            lease = time.time() + 3600
            s.add(JobRow(id=f"busy{i}", owner="dave", checkpoint_id=ckpt, status=RUNNING,
                         request_json=request, runner="elsewhere", lease_until=lease))  # fmt: skip
    r = client.post("/v1/jobs", json={"checkpoint_id": ckpt, "methods": ["l1"]}, headers=DAVE)
    _error(r, 429, "2 queued or running jobs", "PRUNEGRAPH_QUOTA_JOBS")
    assert int(r.headers["retry-after"]) > 0
    with sessions.begin() as s:
        busy = s.get(JobRow, "busy0")
        assert busy is not None
        busy.status = DONE
    r = client.post("/v1/jobs", json={"checkpoint_id": ckpt, "methods": ["l1"]}, headers=DAVE)
    assert r.status_code == 201, r.text


# ---- rate limits, with a clock the test steps -----------------------------------------------


def test_rate_limits_per_user_and_failed_logins_per_address(
    client: TestClient, clock: Clock
) -> None:
    clock.frozen = True
    try:
        c = client
        assert [c.get("/v1/jobs", headers=ALICE).status_code for _ in range(6)] == [200] * 6
        r = c.get("/v1/jobs", headers=ALICE)
        _error(r, 429, "too many requests", "PRUNEGRAPH_RATE_LIMIT")
        assert r.headers["retry-after"] == "10"  # 6 a minute: one more every 10 s
        assert c.get("/v1/jobs", headers=BOB).status_code == 200  # per user
        assert c.get("/healthz").status_code == 200  # no token, no limit
        clock.now += 10
        assert c.get("/v1/jobs", headers=ALICE).status_code == 200
        assert c.get("/v1/jobs", headers=ALICE).status_code == 429
        # no token, or an unknown login cookie, is not a guess: never counted
        assert [c.get("/v1/jobs").status_code for _ in range(5)] == [401] * 5
        cookie = {"Cookie": "prunegraph_session=expired"}
        assert [c.get("/v1/jobs", headers=cookie).status_code for _ in range(5)] == [401] * 5
        # failed authentications: 3 a minute per address, then even a good token waits
        for _ in range(3):
            assert c.get("/v1/jobs", headers={"Authorization": "Bearer guess"}).status_code == 401
        r = c.get("/v1/jobs", headers=CAROL)
        _error(r, 429, "failed authentications")
        assert r.headers["retry-after"] == "20"
        clock.now += 20
        assert c.get("/v1/jobs", headers=CAROL).status_code == 200
        # the dashboard's login form counts too
        clock.now += 20
        login = {"token": "wrong", "next": "/"}
        assert [c.post("/login", data=login).status_code for _ in range(2)] == [401, 401]
        r = c.post("/login", data={**login, "token": "c-token"}, follow_redirects=False)
        assert r.status_code == 429 and r.headers["retry-after"] == "20"
    finally:
        clock.now += 3600  # every bucket full again for the tests after this one
        clock.frozen = False


# ---- the Python client --------------------------------------------------------------------


def test_the_client_waits_out_a_rate_limit_and_raises_on_a_quota(
    client: TestClient, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    import clients.transport
    from clients import NotFoundError, PruneGraphClient, TooManyRequestsError

    slept: list[float] = []

    def sleep(s: float) -> None:  # the client's pauses move the server's clock instead
        slept.append(s)
        clock.now += s

    monkeypatch.setattr(
        clients.transport, "time", types.SimpleNamespace(sleep=sleep, monotonic=time.monotonic)
    )
    pg = PruneGraphClient("http://testserver", token="a-token", http=client)
    clock.frozen = True
    try:
        for _ in range(8):  # past the 6 a minute: the client waits as told and goes on
            client.get("/v1/jobs", headers=ALICE)
        with pytest.raises(NotFoundError):
            pg.job("nope")  # answered (404) after the client waited out the 429
        assert 10.0 in slept
    finally:
        clock.frozen = False
    with pytest.raises(TooManyRequestsError) as quota:
        pg.upload(_bytes(40))  # alice: two checkpoints already, the quota is full
    assert quota.value.retry_after is not None and quota.value.retry_after > 10
    assert "PRUNEGRAPH_QUOTA_BYTES" in quota.value.hint


def test_the_client_sends_a_large_manifest_as_a_file(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clients.job_request
    from clients import PruneGraphClient, build_manifest

    monkeypatch.setattr(clients.job_request, "MANIFEST_AS_FILE", 100)  # this small one is "large"
    pg = PruneGraphClient("http://testserver", token="b-token", http=client)
    ckpt = client.get("/v1/checkpoints", headers=BOB).json()["items"][0]["id"]
    sent: list[str] = []
    client.event_hooks["request"].append(lambda r: sent.append(r.headers["content-type"]))
    try:
        job = pg.submit(
            ckpt, methods=["l1"], manifest=build_manifest(Net(3), torch.zeros(1, 3, 8, 8))
        )
    finally:
        client.event_hooks["request"].pop()
    assert sent[-1].startswith("multipart/form-data")
    assert client.get(f"/v1/jobs/{job}", headers=BOB).json()["has_manifest"] is True


def test_the_api_description_shows_both_job_bodies_with_resolvable_refs(client: TestClient) -> None:
    schema = client.app.openapi()  # type: ignore[attr-defined]
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert {"limit", "cursor"} <= {
        p["name"] for p in schema["paths"]["/v1/jobs"]["get"]["parameters"]
    }

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    components = schema["components"]["schemas"]
    assert "JobRequest" in components and "checkpoint_id" in components["JobRequest"]["properties"]
    missing = {r for r in refs(schema) if r.split("/")[-1] not in components}
    assert not missing and all(r.startswith("#/components/schemas/") for r in refs(schema))
