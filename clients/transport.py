"""How :class:`clients.PruneGraphClient` talks HTTP: one service, retries, errors by status.

:class:`Transport` sends every request to one base URL with the bearer token. Connection failures
(``httpx.ConnectError``/``ConnectTimeout``: the request never reached the server) are retried
with a short exponential backoff (:data:`BACKOFF_S`, doubling up to :data:`MAX_BACKOFF_S`); a 429
whose ``Retry-After`` is short (a rate limit, at most :data:`MAX_RATE_WAIT_S`) is retried after
that pause; nothing else is retried. An error status becomes the exception of its status
(:func:`error_for_response`, the tree in :mod:`clients.errors`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import httpx

from clients.errors import (
    AuthenticationError,
    ConnectionFailedError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PruneGraphHTTPError,
    ServerError,
    TooManyRequestsError,
)

__all__ = ["BACKOFF_S", "MAX_BACKOFF_S", "MAX_RATE_WAIT_S", "Transport", "error_for_response"]

BACKOFF_S = 0.1
"""First pause between connection attempts, in seconds; doubles each time."""
MAX_BACKOFF_S = 2.0
MAX_RATE_WAIT_S = 10.0
"""A 429 asking for a longer pause (a quota) is raised, not waited out."""

_STATUS_ERRORS: dict[int, type[PruneGraphHTTPError]] = {
    401: AuthenticationError,
    404: NotFoundError,
    413: PayloadTooLargeError,
}


def error_for_response(response: httpx.Response) -> PruneGraphHTTPError:
    """The exception for an error response, with the server's ``error`` and ``hint``."""
    error, hint = response.reason_phrase or "error", ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        error, hint = str(body["error"]), str(body.get("hint") or "")
    elif response.text:
        error = response.text[:500]
    code = response.status_code
    if code == 429:
        after = response.headers.get("retry-after", "")
        return TooManyRequestsError(code, error, hint, float(after) if after.isdigit() else None)
    cls = _STATUS_ERRORS.get(code) or (ServerError if code >= 500 else InvalidRequestError)
    return cls(code, error, hint)


class Transport:
    """Requests to one service, with retries and errors by status.

    Args:
        base_url: the service's root URL.
        token: bearer token, when the server has auth enabled.
        http: an ``httpx.Client`` to send requests with (e.g. FastAPI's ``TestClient``); it is
            not closed by :meth:`close`. Default: a client of this object's own.
        retries: attempts per request when the connection fails (at least 1).
        timeout: seconds per HTTP request (only for the client of this object's own).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None,
        http: httpx.Client | None,
        retries: int,
        timeout: float,
    ) -> None:
        if retries < 1:
            raise ValueError(f"retries must be at least 1, got {retries}")
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = http if http is not None else httpx.Client(timeout=timeout)
        self.retries = retries
        self._owns_http = http is None

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def call(self, send: Callable[[], httpx.Response]) -> httpx.Response:
        """``send()`` with the retries; raises the status's exception on an error response."""
        last: httpx.TransportError | None = None
        for attempt in range(self.retries):
            if attempt:
                time.sleep(min(BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S))
            try:
                response = send()
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                last = e
                continue
            if response.is_error:
                error = error_for_response(response)
                wait = getattr(error, "retry_after", None)
                if wait is not None and wait <= MAX_RATE_WAIT_S and attempt + 1 < self.retries:
                    time.sleep(wait)  # a rate limit: the server said when to come back
                    continue
                raise error
            return response
        raise ConnectionFailedError(
            f"cannot connect to {self.base_url} after {self.retries} attempts: {last}; "
            "is the service running (prunegraph serve) and the URL right?"
        ) from last

    def request(self, method: str, path: str, json: Any = None) -> httpx.Response:
        """One request (a JSON body when ``json`` is given)."""
        return self.call(
            lambda: self.http.request(method, self.url(path), json=json, headers=self.headers)
        )

    def post_files(self, path: str, files: Mapping[str, Any]) -> httpx.Response:
        """A multipart POST of ``files`` (httpx's ``files=``; in-memory contents only)."""
        return self.call(lambda: self.http.post(self.url(path), files=files, headers=self.headers))

    def post_file(self, path: str, name: str, content: bytes | Path) -> httpx.Response:
        """A multipart POST of one file field ``file``: ``content`` (bytes, or a file on disk,
        read as it is sent); a retried attempt sends it all again."""
        if isinstance(content, Path):
            with content.open("rb") as f:
                return self._post_file(path, name, f)
        return self._post_file(path, name, content)

    def _post_file(self, path: str, name: str, content: bytes | IO[bytes]) -> httpx.Response:
        def send() -> httpx.Response:
            if not isinstance(content, bytes):
                content.seek(0)
            return self.http.post(
                self.url(path), files={"file": (name, content)}, headers=self.headers
            )

        return self.call(send)

    def close(self) -> None:
        """Close the HTTP client if this object created it (an injected one stays open)."""
        if self._owns_http:
            self.http.close()
