"""``prunegraph serve --demo CKPT``: once the service answers, analyse a checkpoint through it.

The demo runs in a background thread of the serving process and talks to the service over HTTP
with the public client, exactly as a training job would; it prints where the job and its report
are, then a one-line summary when the job is done. A failure is printed, never raised: the
service keeps serving.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
from rich.console import Console

from clients import PruneGraphClient, PruneGraphClientError


def _wait_healthy(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


def run_demo(url: str, checkpoint: Path, token: str | None, console: Console) -> str | None:
    """Upload ``checkpoint``, analyse it with every method, print the links; returns the job id."""
    if not _wait_healthy(url, timeout=120):
        console.print(f"[red]demo:[/] the service at {url} did not come up")
        return None
    try:
        with PruneGraphClient(url, token=token) as client:
            job_id = client.submit(client.upload(checkpoint), seed=0)
            console.print(
                f"demo: analysing {checkpoint.name} as job {job_id}\n"
                f"  status: {url}/v1/jobs/{job_id}\n  report: {url}/v1/jobs/{job_id}/report",
                highlight=False,
            )
            client.wait(job_id, timeout=3600)
            report = client.report(job_id)
    except PruneGraphClientError as e:
        console.print(f"[red]demo failed:[/] {e}", highlight=False)
        return None
    mrp = report.summary.methods.get("mrp")
    worst = ", ".join(mrp.most_redundant[:3]) if mrp is not None else ""
    console.print(
        f"demo done: {report.summary.n_layers} groups analysed"
        + (f"; most redundant (mrp): {worst}" if worst else ""),
        highlight=False,
    )
    return job_id


def start_demo(url: str, checkpoint: Path, token: str | None, console: Console) -> None:
    """Run :func:`run_demo` in a daemon thread (it ends with the server)."""
    threading.Thread(
        target=run_demo, args=(url, checkpoint, token, console), name="demo", daemon=True
    ).start()
