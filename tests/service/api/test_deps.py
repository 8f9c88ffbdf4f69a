"""Issue 15's small things: no server paths in errors, the login cookie holds a revocable
session id (never the token), POST-only logout, nosniff on every response, and an offline
/docs that follows the auth setting."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.jobs.redact import redact, server_roots
from service.main import create_app
from service.settings import Settings
from service.store import logins
from service.store.db import LoginRow, init_db
from service.store.logins import SESSION_COOKIE
from tests.service.helpers import model_bytes

TOKENS = "alice:secret1,bob:secret2"
ALICE = {"Authorization": "Bearer secret1"}


def _client(data_dir: Path, tokens: str = TOKENS) -> TestClient:
    cfg = Settings(data_dir=data_dir, workers=1, tokens=tokens, max_upload_bytes=1 << 20)
    return TestClient(create_app(cfg), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("websec")


@pytest.fixture(scope="module")
def client(data_dir: Path) -> Iterator[TestClient]:
    with _client(data_dir) as c:
        yield c


def _cookie(session: str) -> dict[str, str]:
    return {"Cookie": f"{SESSION_COOKIE}={session}"}


def _login(c: TestClient, token: str) -> str:
    r = c.post("/login", data={"token": token, "next": "/"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    value = r.cookies.get(SESSION_COOKIE)
    assert value
    c.cookies.clear()  # each request below says which cookie it sends
    return str(value)


# ---- paths ----------------------------------------------------------------------------------


def test_redact_hides_paths_under_server_folders_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    text = (
        f"[Errno 2] No such file or directory: '{data}/checkpoints/ab12'; see /docs and "
        f"/v1/jobs; {data}x/other stays"
    )
    out = redact(text, server_roots(data))
    assert str(data) not in out.replace(f"{data}x", "")  # a sibling with a longer name is
    assert "'ab12'" in out and "/docs" in out and "/v1/jobs" in out  # not under data/
    assert redact("/", server_roots()) == "/"


def test_upload_errors_name_no_server_path(client: TestClient, data_dir: Path) -> None:
    """A sharded checkpoint's index as an upload: its shards would be looked up in the server's
    temp folder (and its message named that folder); refused with a 415 naming neither."""
    index = json.dumps({"weight_map": {"a.weight": "model-00001.safetensors"}}).encode()
    r = client.post("/v1/checkpoints", files={"file": ("idx.json", index)}, headers=ALICE)
    assert r.status_code == 415, r.text
    assert "sharded" in r.json()["error"] and r.json()["hint"]
    for root in {str(data_dir), str(data_dir.resolve()), str(Path.cwd())}:
        assert root not in r.text


def test_job_errors_name_no_server_path(client: TestClient, data_dir: Path) -> None:
    """A job whose stored file went away fails with a message that names no server path."""
    up = client.post("/v1/checkpoints", files={"file": ("m.pt", model_bytes(7))}, headers=ALICE)
    assert up.status_code == 201, up.text
    stored = data_dir / "checkpoints" / up.json()["id"]
    stored.write_bytes(b"PK\x03\x04 not a zip any more")  # replaced behind the service's back
    body = {"checkpoint_id": up.json()["id"], "methods": ["l1"]}
    job = client.post("/v1/jobs", json=body, headers=ALICE).json()["id"]
    deadline = time.monotonic() + 120  # a liveness bound
    while (got := client.get(f"/v1/jobs/{job}", headers=ALICE).json())["status"] not in (
        "done",
        "failed",
    ):
        assert time.monotonic() < deadline, got
        time.sleep(0.1)
    assert got["status"] == "failed" and got["error"]
    assert str(data_dir) not in got["error"] and str(data_dir.resolve()) not in got["error"]


# ---- login sessions -------------------------------------------------------------------------


def test_login_cookie_is_a_random_revocable_session(client: TestClient) -> None:
    first, second = _login(client, "secret1"), _login(client, "secret1")
    assert first != second and "secret1" not in first and len(first) >= 32
    rows = client.app.state.pg.sessions  # type: ignore[attr-defined]
    with rows() as s:
        stored = {r.id_sha256 for r in s.query(LoginRow).all()}
    assert hashlib.sha256(first.encode()).hexdigest() in stored and first not in stored
    assert client.get("/v1/jobs", headers=_cookie(first)).status_code == 200
    assert client.get("/v1/jobs", headers=_cookie("secret1")).status_code == 401
    assert client.get("/", headers=_cookie(first)).status_code == 200
    # the old cookie name holding the token no longer logs anyone in
    r = client.get("/", headers={"Cookie": "prunegraph_token=secret1"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")

    assert client.get("/logout", headers=_cookie(first)).status_code == 405
    client.post("/logout", headers={**_cookie(first), "Origin": "https://evil.example"})
    assert client.get("/v1/jobs", headers=_cookie(first)).status_code == 200  # kept
    r = client.post("/logout", headers=_cookie(first), follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.get("/v1/jobs", headers=_cookie(first)).status_code == 401  # revoked
    assert client.get("/v1/jobs", headers=_cookie(second)).status_code == 200

    with rows.begin() as s:  # expiry
        s.query(LoginRow).update({LoginRow.expires_at: time.time() - 1})
    assert client.get("/v1/jobs", headers=_cookie(second)).status_code == 401


def test_sessions_end_when_the_users_token_is_removed(tmp_path: Path) -> None:
    _, sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    bob = logins.start(sessions, "bob", 60.0)
    assert logins.user_of(sessions, bob, {"alice", "bob"}) == "bob"
    assert logins.user_of(sessions, bob, {"alice"}) is None  # bob's token was removed
    assert logins.user_of(sessions, "x" * 10_000, {"bob"}) is None
    assert logins.end_all(sessions, "bob") == 1
    assert logins.user_of(sessions, bob, {"alice", "bob"}) is None


def test_a_cookie_never_authorizes_a_write(client: TestClient) -> None:
    session = _login(client, "secret1")
    r = client.post("/v1/jobs", json={"checkpoint_id": "0" * 64}, headers=_cookie(session))
    assert r.status_code == 401


# ---- headers and docs -----------------------------------------------------------------------


def test_every_response_says_nosniff(client: TestClient) -> None:
    for r in (
        client.get("/healthz"),
        client.get("/v1/jobs", headers=ALICE),
        client.get("/v1/jobs"),  # 401
        client.get(f"/v1/jobs/{'0' * 32}", headers=ALICE),  # 404
        client.post("/v1/jobs", json={"x": 1}, headers=ALICE),  # 422
    ):
        assert r.headers["x-content-type-options"] == "nosniff", (r.status_code, r.text)


def test_docs_need_auth_when_tokens_are_set_and_work_offline(client: TestClient) -> None:
    assert client.get("/openapi.json").status_code == 401
    r = client.get("/docs", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/docs"
    spec = client.get("/openapi.json", headers=ALICE)
    assert spec.status_code == 200 and "/v1/jobs" in spec.json()["paths"]
    session = _cookie(_login(client, "secret1"))
    page = client.get("/docs", headers=session)
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert client.get("/openapi.json", headers=session).status_code == 200  # what the page loads
    _assert_offline(client, page.text, session)
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp and "http" not in csp


def _assert_offline(c: TestClient, html: str, headers: dict[str, str]) -> None:
    """Nothing from another origin; every asset the page names is served here."""
    assert not re.search(r"(src|href|url)\s*[=:]\s*['\"]?(https?:)?//", html), html
    assets = re.findall(r"(?:src|href)=\"([^\"]+)\"", html)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets), assets
    for asset in assets:
        r = c.get(asset, headers=headers)
        assert r.status_code == 200 and len(r.content) > 100, asset
    assert "validatorUrl" in html and '"validatorUrl": null' in html
