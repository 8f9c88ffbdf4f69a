"""The one place where errors become HTTP responses: JSON ``{"error": ..., "hint": ...}``.

The library's errors (:mod:`graphs.errors`) and the service's domain errors
(:mod:`service.errors`) are mapped to status codes here, by class; :class:`ApiError` is for what
only the HTTP layer knows (authentication, rate limits, body limits, bad pages and requests).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from graphs.contracts.jobs import INVALID_REQUEST_HINT, invalid_request_message
from graphs.errors import (
    CheckpointError,
    InvalidInputError,
    NoPrunableLayersError,
    PruneGraphError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from service.errors import (
    JobFailedError,
    MissingPartError,
    NotFoundError,
    NotMultipartError,
    NotReadyError,
    ServiceError,
    TooLargeError,
    UploadError,
)
from service.jobs.redact import redact, server_roots


class ApiError(Exception):
    """An error of the service itself (not found, too large, unauthorized, not ready)."""

    def __init__(
        self, status: int, message: str, hint: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.hint = hint
        self.headers = headers


# Most specific first: the first matching class decides the status.
STATUS: list[tuple[type[PruneGraphError], int]] = [
    (UnsafeCheckpointError, 422),
    (UnsupportedFormatError, 415),
    (NoPrunableLayersError, 422),
    (CheckpointError, 422),
    (InvalidInputError, 422),
    (PruneGraphError, 400),
]


SERVICE_STATUS: list[tuple[type[ServiceError], int]] = [
    (NotFoundError, 404),
    (NotReadyError, 409),
    (JobFailedError, 422),
    (TooLargeError, 413),
    (NotMultipartError, 415),
    (MissingPartError, 422),
    (UploadError, 400),
]


def status_for(exc: PruneGraphError | ServiceError) -> int:
    """The HTTP status of a library or domain error (the first matching class decides)."""
    if isinstance(exc, ServiceError):
        return next((code for cls, code in SERVICE_STATUS if isinstance(exc, cls)), 400)
    return next(code for cls, code in STATUS if isinstance(exc, cls))


def body(error: str, hint: str) -> dict[str, str]:
    return {"error": error, "hint": hint}


async def _library(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PruneGraphError)
    state = getattr(request.app.state, "pg", None)
    roots = server_roots(state.settings.data_dir if state is not None else None)
    message, hint = redact(exc.message, roots), redact(exc.hint, roots)  # no server paths
    return JSONResponse(body(message, hint), status_code=status_for(exc))


async def _api(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(body(exc.message, exc.hint), status_code=exc.status, headers=exc.headers)


async def _service(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    # a body over the limit is not read to its end: the connection cannot be reused
    headers = {"Connection": "close"} if isinstance(exc, TooLargeError) else None
    return JSONResponse(body(exc.message, exc.hint), status_code=status_for(exc), headers=headers)


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message = invalid_request_message(list(exc.errors()))
    return JSONResponse(body(message, INVALID_REQUEST_HINT), status_code=422)


async def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(
        body(str(exc.detail), "See the API description at /docs."),
        status_code=exc.status_code,
        headers=exc.headers,
    )


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(PruneGraphError, _library)
    app.add_exception_handler(ApiError, _api)
    app.add_exception_handler(ServiceError, _service)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
