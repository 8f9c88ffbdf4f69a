"""clients.polling: waiting for a job until it ends, fails or runs out of time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from clients import JobFailedError, JobStatus, JobTimeoutError
from clients.polling import wait_for_job


def status(state: str, progress: float, error: str | None = None) -> JobStatus:
    return JobStatus(
        id="j1", status=state, progress=progress, error=error, checkpoint_id="c1", request={},
        has_plan=False, cache_hits=0, cache_misses=0, created_at=1.0, updated_at=2.0,
    )  # fmt: skip


def answers(*states: JobStatus) -> Iterator[JobStatus]:
    """The statuses in turn, then the last one forever."""
    yield from states
    while True:
        yield states[-1]


@pytest.mark.parametrize("progress", [False, True])
def test_waits_until_done(progress: bool) -> None:
    seen: list[str] = []
    states = answers(status("queued", 0.0), status("running", 0.5), status("done", 1.0))

    def fetch(job_id: str) -> JobStatus:
        seen.append(job_id)
        return next(states)

    done = wait_for_job(fetch, "j1", timeout=60, poll=0.001, progress=progress)
    assert done.status == "done" and done.finished and seen == ["j1"] * 3


def test_a_failed_job_raises_with_the_servers_reason() -> None:
    states = answers(status("running", 0.5), status("failed", 0.5, "NaN weights in fc"))
    with pytest.raises(JobFailedError, match="NaN weights") as info:
        wait_for_job(lambda _: next(states), "j1", timeout=60, poll=0.001, progress=False)
    assert info.value.job_id == "j1" and info.value.reason == "NaN weights in fc"


def test_an_unfinished_job_times_out_with_its_last_status() -> None:
    running = status("running", 0.25)
    with pytest.raises(JobTimeoutError, match="running") as timeout:
        wait_for_job(lambda _: running, "j1", timeout=0.05, poll=0.01, progress=False)
    assert isinstance(timeout.value, TimeoutError) and timeout.value.last.progress == 0.25
