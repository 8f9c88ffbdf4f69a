"""The one place where errors become HTTP responses: JSON ``{"error": ..., "hint": ...}``."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from graphs.errors import (
    CheckpointError,
    InvalidInputError,
    NoPrunableLayersError,
    PruneGraphError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
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


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(
        404,
        f"{what} {ident} not found",
        f"Check the id; a {what} is visible only to the token that created it.",
    )


# Most specific first: the first matching class decides the status.
STATUS: list[tuple[type[PruneGraphError], int]] = [
    (UnsafeCheckpointError, 422),
    (UnsupportedFormatError, 415),
    (NoPrunableLayersError, 422),
    (CheckpointError, 422),
    (InvalidInputError, 422),
    (PruneGraphError, 400),
]


def status_for(exc: PruneGraphError) -> int:
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


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()))
    msg = str(first.get("msg", "invalid request")).replace("Value error, ", "")
    return JSONResponse(
        body(f"invalid request at {where}: {msg}", "See the request schema at /docs."),
        status_code=422,
    )


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
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
