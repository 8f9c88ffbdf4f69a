"""A real `prunegraph serve` process on 127.0.0.1 for tests (started and killed by the test)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        log: Path | None = None,
    ) -> None:
        self.data_dir, self.port = data_dir, free_port()
        self.env, self.args, self.log = env or {}, args, log
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "prunegraph", "serve", "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--workers", "1", *self.args]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRUNEGRAPH_TOKEN")}
        env.update(self.env)
        out = self.log.open("ab") if self.log is not None else None
        try:
            self.proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=out)
        finally:
            if out is not None:
                out.close()  # the child has its own copy
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.kill()
        raise AssertionError("prunegraph serve did not answer /healthz within 60 s")

    def kill(self) -> None:
        """SIGKILL the server and its worker processes (its whole session)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


def wait_job(
    url: str, job: str, want: set[str], timeout: float = 120, poll: float = 0.1
) -> dict[str, object]:
    """Poll ``GET /v1/jobs/{job}`` until its status is one of ``want``; its last body."""
    body: dict[str, object] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = httpx.get(f"{url}/v1/jobs/{job}", timeout=10).json()
        if body["status"] in want:
            return dict(body)
        time.sleep(poll)
    raise AssertionError(f"job {job} did not reach {want} in {timeout} s: {body}")
