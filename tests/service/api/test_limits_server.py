"""Bounded requests, quotas and rate limits on a real `prunegraph serve` (issue 15 points 2, 3).

One server with small limits; the tests run in file order and the last one blocks the client
address (failed authentications). Loops are bounded; nothing asserts a duration.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import torch

from service.settings import Settings
from service.store.db import RUNNING, JobRow, init_db
from tests.server_process import Server

pytestmark = [pytest.mark.slow]

TOKENS = "alice:alice-token\nbob:bob-token\ncarol:carol-token\n"
ALICE = {"Authorization": "Bearer alice-token"}
BOB = {"Authorization": "Bearer bob-token"}
CAROL = {"Authorization": "Bearer carol-token"}
MAX_JSON = 65536
MAX_UPLOAD = 1_000_000
RATE = 60  # requests a minute per user
AUTH_FAILURES = 5  # a minute per address


def _model_bytes(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    torch.save({"conv.weight": torch.randn(8, 3, 3, 3, generator=g)}, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("limits-server")
    (root / "tokens").write_text(TOKENS)
    data = root / "data"
    (data / "tmp").mkdir(parents=True)
    crashed = data / "tmp" / "upload-crashed"  # left by a killed server an hour ago
    crashed.write_bytes(b"half an upload")
    os.utime(crashed, (time.time() - 3600, time.time() - 3600))
    env = {
        "PRUNEGRAPH_TOKENS_FILE": str(root / "tokens"),
        "PRUNEGRAPH_MAX_JSON_BYTES": str(MAX_JSON),
        "PRUNEGRAPH_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "PRUNEGRAPH_UPLOAD_IDLE_S": "1",
        "PRUNEGRAPH_QUOTA_BYTES": str(2 * len(_model_bytes(0)) + 100),
        "PRUNEGRAPH_QUOTA_JOBS": "1",
        "PRUNEGRAPH_RATE_LIMIT": str(RATE),
        "PRUNEGRAPH_AUTH_FAILURE_LIMIT": str(AUTH_FAILURES),
    }
    s = Server(data, env=env)
    s.start()
    try:
        yield s
    finally:
        s.kill()


def _error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "hint"}
    for w in words:
        assert w in f"{body['error']} {body['hint']}", body


def _tmp_files(server: Server) -> list[str]:
    return sorted(p.name for p in (server.data_dir / "tmp").iterdir())


def test_stale_temp_files_are_gone_at_start(server: Server) -> None:
    assert _tmp_files(server) == []


def test_json_bodies_are_bounded_and_manifests_go_as_files(server: Server) -> None:
    c = httpx.Client(base_url=server.url, timeout=60)
    up = c.post("/v1/checkpoints", files={"file": ("m.pt", _model_bytes(0))}, headers=ALICE)
    ckpt = up.json()["id"]
    huge = {"checkpoint_id": ckpt, "manifest": {"layers": [{"pad": "x" * MAX_JSON}]}}
    _error(c.post("/v1/jobs", json=huge, headers=ALICE), 413, "manifest", "multipart")
    # the way out the hint names: the manifest as a file (here an invalid one: it is read)
    files: dict[str, tuple[str | None, bytes]] = {
        "request": (None, json.dumps({"checkpoint_id": ckpt}).encode()),
        "manifest": ("m.json", b"[]"),
    }
    _error(c.post("/v1/jobs", files=files, headers=ALICE), 422, "manifest")
    assert _tmp_files(server) == []


def test_the_whole_multipart_body_is_bounded(server: Server) -> None:
    """A body of 600 MB in a field that is not the file: refused before it is read."""
    sent = 0
    head = b'--B\r\nContent-Disposition: form-data; name="padding"\r\n\r\n'

    def body() -> Iterator[bytes]:
        nonlocal sent
        yield head
        chunk = b"x" * (1 << 20)
        for _ in range(600):
            sent += len(chunk)
            yield chunk

    headers = {**ALICE, "content-type": "multipart/form-data; boundary=B"}
    try:
        r = httpx.post(f"{server.url}/v1/checkpoints", content=body(), headers=headers, timeout=60)
        _error(r, 413, "request body")
    except httpx.TransportError:
        pass  # the server answered 413 and closed while the client was still sending
    assert sent < 64 << 20, f"the server read {sent:,} bytes of a body over its limit"
    assert _tmp_files(server) == []
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def _stalled(server: Server, request: bytes) -> bytes:
    """Send ``request`` (a body cut short) and read the answer; the server must close."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):  # bounded by the 60 s socket timeout
            answer += chunk
    return answer


def test_stalled_bodies_are_closed_and_their_temp_files_removed(server: Server) -> None:
    part = (
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="m.pt"\r\n\r\n'
        + _model_bytes(1)[:5000]
    )
    upload = (
        b"POST /v1/checkpoints HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\n"
        b"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 900000\r\n\r\n" + part
    )
    answer = _stalled(server, upload)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"PRUNEGRAPH_UPLOAD_IDLE_S" in answer
    assert _tmp_files(server) == []
    job = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\n"
        b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"checkpoint_id": '
    )
    assert _stalled(server, job).startswith(b"HTTP/1.1 408 ")


def test_lists_are_paginated_summaries(server: Server) -> None:
    c = httpx.Client(base_url=server.url, timeout=60, headers=BOB)
    for seed in (2, 3):
        assert c.post("/v1/checkpoints", files={"file": ("m.pt", _model_bytes(seed))}).is_success
    first = c.get("/v1/checkpoints", params={"limit": 1}).json()
    second = c.get("/v1/checkpoints", params={"limit": 1, "cursor": first["next_cursor"]}).json()
    assert second["next_cursor"] is None
    assert len({first["items"][0]["id"], second["items"][0]["id"]}) == 2
    assert c.get("/v1/jobs").json() == {"items": [], "next_cursor": None}


def test_quotas_per_user(server: Server) -> None:
    c = httpx.Client(base_url=server.url, timeout=60, headers=BOB)
    r = c.post("/v1/checkpoints", files={"file": ("m.pt", _model_bytes(4))})  # bob has two
    _error(r, 429, "quota", "PRUNEGRAPH_QUOTA_BYTES")
    assert int(r.headers["retry-after"]) > 0
    ckpt = c.get("/v1/checkpoints").json()["items"][0]["id"]
    # a job another replica runs for bob fills his job quota (1)
    _, sessions = init_db(Settings(data_dir=server.data_dir).db_url())  # the server's database
    with sessions.begin() as s:
        s.add(JobRow(id="elsewhere", owner="bob", checkpoint_id=ckpt, request_json="{}",
                     status=RUNNING, runner="other", lease_until=time.time() + 3600))  # fmt: skip
    r = c.post("/v1/jobs", json={"checkpoint_id": ckpt, "methods": ["l1"]})
    _error(r, 429, "queued or running", "PRUNEGRAPH_QUOTA_JOBS")
    assert int(r.headers["retry-after"]) > 0


def test_rate_limits_per_user_then_per_address(server: Server) -> None:
    c = httpx.Client(base_url=server.url, timeout=60)
    codes = [c.get("/v1/jobs", headers=CAROL).status_code for _ in range(3 * RATE)]
    assert codes[0] == 200 and 429 in codes
    r = c.get("/v1/jobs", headers=CAROL)
    _error(r, 429, "too many requests", "PRUNEGRAPH_RATE_LIMIT")
    assert int(r.headers["retry-after"]) >= 1
    assert c.get("/v1/jobs", headers=ALICE).status_code == 200  # another user is not limited
    # failed authentications from this address: then even a good token waits
    bad = {"Authorization": "Bearer guess"}
    codes = [c.get("/v1/jobs", headers=bad).status_code for _ in range(3 * AUTH_FAILURES)]
    assert codes[0] == 401 and 429 in codes
    r = c.get("/v1/jobs", headers=ALICE)
    _error(r, 429, "failed authentications")
    assert int(r.headers["retry-after"]) >= 1
