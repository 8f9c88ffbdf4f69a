"""PRUNEGRAPH_TOKENS_FILE: users and their tokens from a file, settings from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import Settings
from tests.service.helpers import model_bytes, wait_for_job

TOKENS_FILE = """\
# prunegraph users, one user:token a line

alice:alice-token-1
   # an indented comment

bob:bob-token-2

"""
ALICE = {"Authorization": "Bearer alice-token-1"}
BOB = {"Authorization": "Bearer bob-token-2"}


def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tokens: str) -> None:
    path = tmp_path / "tokens.txt"
    path.write_text(tokens, encoding="utf-8")
    for name in ("TOKENS", "DATABASE_URL", "MAX_UPLOAD_BYTES"):
        monkeypatch.delenv(f"PRUNEGRAPH_{name}", raising=False)
    monkeypatch.setenv("PRUNEGRAPH_TOKENS_FILE", str(path))
    monkeypatch.setenv("PRUNEGRAPH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PRUNEGRAPH_WORKERS", "1")


def test_users_from_the_tokens_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _env(monkeypatch, tmp_path, TOKENS_FILE)
    settings = Settings()
    assert settings.data_dir == tmp_path / "data" and settings.tokens_file is not None
    assert settings.token_users() == {"alice-token-1": "alice", "bob-token-2": "bob"}
    with TestClient(create_app(settings)) as c:
        assert c.get("/v1/jobs", headers=ALICE).json() == {"items": [], "next_cursor": None}
        assert c.get("/v1/jobs", headers=BOB).json()["items"] == []
        for bad in ({}, {"Authorization": "Bearer nobody"}, {"Authorization": "alice-token-1"}):
            r = c.get("/v1/jobs", headers=bad)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert set(r.json()) == {"error", "hint"}
        # a comment line is not a token, and neither is a user name
        for text in ("# prunegraph users, one user:token a line", "alice", ""):
            assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {text}"}).status_code == 401

        up = c.post("/v1/checkpoints", files={"file": ("m.pt", model_bytes(5))}, headers=ALICE)
        assert up.status_code == 201, up.text
        ckpt = up.json()["id"]
        job = c.post("/v1/jobs", json={"checkpoint_id": ckpt, "methods": ["l1"]}, headers=ALICE)
        assert job.status_code == 201, job.text
        job_id = job.json()["id"]
        assert wait_for_job(c, job_id, ALICE)["status"] == "done"
        assert c.get(f"/v1/jobs/{job_id}/report", headers=ALICE).status_code == 200
        # alice sees hers; bob sees nothing of alice's, and gets 404 (not 403) for it
        assert [j["id"] for j in c.get("/v1/jobs", headers=ALICE).json()["items"]] == [job_id]
        assert c.get("/v1/jobs", headers=BOB).json()["items"] == []
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/report", f"/v1/jobs/{job_id}/plan"):
            r = c.get(path, headers=BOB)
            assert r.status_code == 404 and "visible only to the token" in r.json()["hint"]
        assert c.post("/v1/jobs", json={"checkpoint_id": ckpt}, headers=BOB).status_code == 404
        assert c.delete(f"/v1/checkpoints/{ckpt}", headers=BOB).status_code == 404
        assert c.get(f"/v1/jobs/{job_id}", headers=ALICE).status_code == 200


@pytest.mark.parametrize(
    ("tokens", "words"),
    [
        ("alice:ok\njust-a-token\n", "line 2 is not user:token"),
        ("alice:ok\n:no-user\n", "line 2 is not user:token"),
        ("alice:\n", "line 1 is not user:token"),
        ("alice:same\nbob : same\n", "line 2: a token of user 'alice' is reused"),
    ],
    ids=["no-colon", "no-user", "no-token", "shared-token"],
)
def test_a_malformed_tokens_file_stops_startup(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tokens: str, words: str
) -> None:
    _env(monkeypatch, tmp_path, tokens)
    app = create_app(Settings())
    with pytest.raises(ValueError, match=words) as error, TestClient(app):
        pass
    assert "just-a-token" not in str(error.value)  # a malformed line may be a secret


def test_spaces_around_user_and_token_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(" alice : s1 \n")
    assert Settings(data_dir=tmp_path, tokens_file=path).token_users() == {"s1": "alice"}


def test_a_missing_tokens_file_stops_startup(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _env(monkeypatch, tmp_path, "")
    missing = tmp_path / "nope.txt"
    monkeypatch.setenv("PRUNEGRAPH_TOKENS_FILE", str(missing))
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"), TestClient(create_app(Settings())):
        pass
