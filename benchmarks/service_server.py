"""The server of the service-overhead benchmark (:mod:`benchmarks.service_overhead`): a real
``prunegraph serve`` on 127.0.0.1 with a fresh data dir, in its own session so that it and its
workers stop together."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from benchmarks.support.paths import ROOT
from benchmarks.support.ports import free_port


class Server:
    """``prunegraph serve`` in its own session (so it and its workers are stopped together)."""

    def __init__(self, data_dir: Path, workers: int) -> None:
        self.data_dir, self.workers, self.port = data_dir, workers, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_s = math.nan

    def start(self, timeout: float = 120.0) -> None:
        cmd = [sys.executable, "-m", "prunegraph", "serve", "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--workers", str(self.workers)]  # fmt: skip
        # auth off and the default SQLite in the data dir, whatever this shell has set
        drop = ("PRUNEGRAPH_TOKENS", "PRUNEGRAPH_TOKENS_FILE", "PRUNEGRAPH_DATABASE_URL")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        t0 = time.perf_counter()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prunegraph serve exited {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    self.start_s = time.perf_counter() - t0
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(
            f"prunegraph serve did not answer /healthz in {timeout:g} s: {self.tail()}"
        )

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the whole session (server and workers), SIGKILL what is left after 15 s."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers that outlived the server
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)
        self.proc = None


@contextlib.contextmanager
def running_server(workers: int) -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="prunegraph-bench-") as tmp:
        server = Server(Path(tmp) / "data", workers)
        try:
            server.start()
            yield server
        except BaseException:
            print(f"--- server log (tail) ---\n{server.tail()}", file=sys.stderr)
            raise
        finally:
            server.stop()
