"""Deletes racing uploads of the same bytes on a real `prunegraph serve` (issue 15 point 1).

Two users; in each round one of them holds a checkpoint and deletes it while the other uploads
the very same bytes. Whatever the interleaving, the uploader's 201 must leave the shared file in
place and their job must find it. Bounded loop, seeded jitter; no timing is asserted.
"""

from __future__ import annotations

import hashlib
import io
import random
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.server_process import Server

pytestmark = [pytest.mark.slow]

TOKENS = "alice:alice-token\nbob:bob-token\n"
HEADERS = {u: {"Authorization": f"Bearer {u}-token"} for u in ("alice", "bob")}
ROUNDS = 100
JOB_EVERY = 20  # a job in every twentieth round (each job is a real analysis)


def _model_bytes(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "fc.weight": torch.randn(4, 8, generator=g),
    }
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def _upload(c: httpx.Client, user: str, data: bytes) -> httpx.Response:
    return c.post("/v1/checkpoints", files={"file": ("m.pt", data)}, headers=HEADERS[user])


def _delete(
    c: httpx.Client,
    start: threading.Barrier,
    sha: str,
    holder: str,
    jitter: float,
    result: dict[str, int],
) -> None:
    start.wait()
    time.sleep(jitter)  # spreads the delete over the upload's steps
    result["delete"] = c.delete(f"/v1/checkpoints/{sha}", headers=HEADERS[holder]).status_code


def test_deletes_racing_uploads_of_the_same_bytes_lose_no_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS)
    data_dir = tmp_path / "data"
    env = {"PRUNEGRAPH_TOKENS_FILE": str(tokens), "PRUNEGRAPH_QUOTA_JOBS": "0"}
    server = Server(data_dir, env=env)
    server.start()
    rng = random.Random(0)
    lost: list[int] = []
    jobs: list[tuple[str, str]] = []
    try:
        with (
            httpx.Client(base_url=server.url, timeout=60) as a,
            httpx.Client(base_url=server.url, timeout=60) as b,
        ):
            for i in range(ROUNDS):
                holder, uploader = ("alice", "bob") if i % 2 == 0 else ("bob", "alice")
                data = _model_bytes(i)
                sha = hashlib.sha256(data).hexdigest()
                assert _upload(a, holder, data).status_code == 201
                start = threading.Barrier(2)
                result: dict[str, int] = {}
                args = (a, start, sha, holder, rng.uniform(0.0, 0.03), result)
                t = threading.Thread(target=_delete, args=args)
                t.start()
                start.wait()
                up = _upload(b, uploader, data)
                t.join()
                assert result["delete"] == 204 and up.status_code == 201, up.text
                if not (data_dir / "checkpoints" / sha).is_file():
                    lost.append(i)
                if i % JOB_EVERY == 0:
                    req = {"checkpoint_id": sha, "methods": ["l1"]}
                    r = b.post("/v1/jobs", json=req, headers=HEADERS[uploader])
                    assert r.status_code == 201, r.text
                    jobs.append((r.json()["id"], uploader))
            assert lost == [], f"files lost in rounds {lost} of {ROUNDS}"
            for job_id, user in jobs:
                body: dict[str, object] = {}
                for _ in range(1200):  # bounded: 120 s a job at most
                    body = a.get(f"/v1/jobs/{job_id}", headers=HEADERS[user]).json()
                    if body["status"] in ("done", "failed"):
                        break
                    time.sleep(0.1)
                assert body["status"] == "done", body  # found its checkpoint, analysed it
            # nothing left behind either: every stored file is somebody's checkpoint
            stored = {p.name for p in (data_dir / "checkpoints").iterdir()}
            assert len(stored) == ROUNDS
    finally:
        server.kill()
