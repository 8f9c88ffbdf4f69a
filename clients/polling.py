"""Waiting for a job: poll its status until it ends, with an optional progress bar on stderr."""

from __future__ import annotations

import time
from collections.abc import Callable

from clients.errors import JobFailedError, JobTimeoutError
from graphs.contracts.jobs import JobStatus

__all__ = ["wait_for_job"]


def wait_for_job(
    fetch: Callable[[str], JobStatus],
    job_id: str,
    *,
    timeout: float,
    poll: float,
    progress: bool,
) -> JobStatus:
    """Call ``fetch(job_id)`` every ``poll`` seconds until the job is ``done`` or ``failed``.

    ``progress=True`` draws a progress bar on stderr (rich). Raises :class:`JobFailedError`
    (with the server's reason) when the job failed and :class:`JobTimeoutError` when it is still
    unfinished after ``timeout`` seconds.
    """
    if not progress:
        status = _poll(fetch, job_id, timeout, poll, lambda _: None)
    else:
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(f"job {job_id[:12]}", total=1.0)

            def show(s: JobStatus) -> None:
                bar.update(task, completed=s.progress, description=f"job {job_id[:12]} {s.status}")

            status = _poll(fetch, job_id, timeout, poll, show)
    if status.status == "failed":
        raise JobFailedError(job_id, status.error or "no reason given")
    return status


def _poll(
    fetch: Callable[[str], JobStatus],
    job_id: str,
    timeout: float,
    poll: float,
    show: Callable[[JobStatus], None],
) -> JobStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = fetch(job_id)
        show(status)
        if status.finished:
            return status
        left = deadline - time.monotonic()
        if left <= 0:
            raise JobTimeoutError(job_id, timeout, status)
        time.sleep(min(poll, left))
