"""Clean crashes of a real `prunegraph serve`: after kill -9 of the server (not of its process
group), its pool workers exit by themselves, and the temp file of an upload cut off by the crash
is removed when the server starts again."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped]
import pytest

from service.jobs.lifeline import exit_with_parent
from tests.server_process import Server, wait_job
from tests.service.helpers import model_bytes

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "data", args=("--workers", "2"))
    try:
        yield s
    finally:
        s.kill()  # the whole process group: whatever a failed test left


def _wait_until(what: str, done: object, bound_s: float = 60.0) -> None:
    """Poll ``done()`` until true; a liveness bound, generous for a loaded machine."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if done():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} (still not after {bound_s:.0f} s)")


def test_kill_9_leaves_no_worker_and_no_temp_file(server: Server) -> None:
    """kill -9 of the server alone (its process group left alone) while an upload is cut off:
    its workers exit by themselves, and the next start removes the upload's temp file."""
    server.start()
    assert server.proc is not None
    files = {"file": ("m.pt", model_bytes())}
    up = httpx.post(f"{server.url}/v1/checkpoints", files=files, timeout=120)
    assert up.status_code == 201, up.text
    req = {"checkpoint_id": up.json()["id"], "methods": ["l1"], "seed": 0}
    job = httpx.post(f"{server.url}/v1/jobs", json=req, timeout=30).json()["id"]
    assert wait_job(server.url, job, {"done", "failed"})["status"] == "done"
    workers = psutil.Process(server.proc.pid).children(recursive=True)
    assert len(workers) >= 2, workers  # the pool's two workers (and the resource tracker)
    tmp = server.data_dir / "tmp"
    sock = _cut_upload(server.url, tmp)
    left = list(tmp.glob("upload-*"))

    os.kill(server.proc.pid, signal.SIGKILL)  # the server only, not its process group
    server.proc.wait(timeout=30)
    sock.close()

    def gone() -> bool:
        return not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)

    try:
        _wait_until(f"workers {[w.pid for w in workers]} outlived their killed server", gone)
    finally:
        for w in workers:  # what a failure leaves behind
            with contextlib.suppress(psutil.Error):
                w.kill()
    assert left and all(p.exists() for p in left), "the crash left no temp file: nothing tested"
    # a temp file is stale once no process holds its lock and it is a few seconds old
    _wait_until("temp file not old enough", lambda: time.time() - _mtime(left) > 6.0)
    server.start()  # answers /healthz only after its start-up clean-up ran
    assert not any(p.exists() for p in left), "the crashed upload's temp file is still there"
    assert httpx.post(f"{server.url}/v1/checkpoints", files=files, timeout=120).status_code == 201


def _cut_upload(url: str, tmp: Path) -> socket.socket:
    """Start a multipart upload that promises 64 MiB, send 1 MiB of it, leave it open; returns
    once the server has its temp file."""
    host, port = url.removeprefix("http://").split(":")
    boundary = "cutcutcut"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.pt"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST /v1/checkpoints HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(head) + (64 << 20)}\r\n\r\n".encode()
        + head
        + b"\0" * (1 << 20)
    )
    _wait_until("the upload has no temp file", lambda: any(tmp.glob("upload-*")))
    return sock


def _mtime(paths: list[Path]) -> float:
    return max(p.stat().st_mtime for p in paths)


def test_a_worker_whose_parent_already_died_exits(tmp_path: Path) -> None:
    """exit_with_parent called with a parent that is not (or no longer) the parent exits at once
    (the watchdog's own check), in a child process of its own."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=exit_with_parent, args=(1,))  # pid 1 is never our parent here
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 0
