"""clients.transport through PruneGraphClient with mocked HTTP: retries, errors by status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

import clients.transport
from clients import (
    AuthenticationError,
    ConnectionFailedError,
    InvalidRequestError,
    JobStatus,
    JobTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
    PruneGraphClient,
    PruneGraphHTTPError,
    ServerError,
    TooManyRequestsError,
)
from clients.transport import error_for_response


def mock(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


def job(status: str = "done", progress: float = 1.0) -> dict[str, Any]:
    """A full job status as the service answers it, plus a field this client does not know."""
    known = JobStatus(
        id="j1", status=status, progress=progress, error=None, checkpoint_id="c1", request={},
        has_plan=False, cache_hits=0, cache_misses=0, created_at=1.0, updated_at=2.0,
    )  # fmt: skip
    return {**known.model_dump(mode="json"), "extra": 1}


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clients.transport, "BACKOFF_S", 0.0)


def test_connection_errors_are_retried() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) <= 2:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json=job())

    client = PruneGraphClient("http://svc:1/", token="t", http=mock(handler), retries=3)
    assert client.job("j1") == JobStatus.model_validate(job())
    assert len(calls) == 3
    assert str(calls[-1].url) == "http://svc:1/v1/jobs/j1"
    assert calls[-1].headers["authorization"] == "Bearer t"


def test_connection_failure_after_all_attempts() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectTimeout("timed out", request=request)

    client = PruneGraphClient("http://svc:1", http=mock(handler), retries=4)
    with client, pytest.raises(ConnectionFailedError, match="after 4 attempts"):
        client.upload(b"weights")
    assert len(calls) == 4


def test_a_retried_upload_sends_the_whole_file_again(tmp_path: Any) -> None:
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        if len(bodies) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(201, json={"id": "c1"})

    path = tmp_path / "weights.pt"
    path.write_bytes(b"0123456789" * 100)
    client = PruneGraphClient("http://svc:1", http=mock(handler), retries=2)
    assert client.upload(path) == "c1"
    assert len(bodies) == 2 and b"0123456789" * 100 in bodies[1]


def test_server_errors_and_timeouts_are_not_retried() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if request.url.path.endswith("/boom"):
            return httpx.Response(503, text="upstream down")
        return httpx.Response(200, json=job("running", 0.25))

    client = PruneGraphClient("http://svc:1", http=mock(handler))
    with pytest.raises(ServerError, match="upstream down") as info:
        client.job("boom")
    assert isinstance(info.value, PruneGraphHTTPError) and info.value.status_code == 503
    assert len(calls) == 1
    with pytest.raises(JobTimeoutError, match="running") as timeout:
        client.wait("j1", timeout=0.05, poll=0.01)
    assert isinstance(timeout.value, TimeoutError) and timeout.value.last.progress == 0.25


def test_retries_must_be_positive() -> None:
    with pytest.raises(ValueError, match="retries"):
        PruneGraphClient(retries=0)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, InvalidRequestError),
        (401, AuthenticationError),
        (404, NotFoundError),
        (413, PayloadTooLargeError),
        (422, InvalidRequestError),
        (429, TooManyRequestsError),
        (500, ServerError),
        (503, ServerError),
    ],
)
def test_each_status_has_its_error_with_the_body(status: int, cls: type) -> None:
    body = {"error": "what was wrong", "hint": "what to do"}
    error = error_for_response(httpx.Response(status, json=body, headers={"retry-after": "7"}))
    assert type(error) is cls and error.status_code == status
    assert (error.error, error.hint) == ("what was wrong", "what to do")
    assert str(error) == f"HTTP {status}: what was wrong (what to do)"
    if status == 429:
        assert isinstance(error, TooManyRequestsError) and error.retry_after == 7.0


def test_a_body_that_is_not_json_is_the_error_text() -> None:
    error = error_for_response(httpx.Response(502, text="bad gateway " * 100))
    assert error.error == ("bad gateway " * 100)[:500] and error.hint == ""
    blank = error_for_response(httpx.Response(429))
    assert isinstance(blank, TooManyRequestsError) and blank.retry_after is None
    assert blank.error == "Too Many Requests"
