"""The one mapping from errors to HTTP (service.api.errors): every domain and library error class
has its status and a JSON body with a hint; only the API knows HTTP."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import service
from graphs import errors as library
from service import errors as domain
from service.api.errors import install, status_for

EXPECTED = {
    domain.NotFoundError: 404,
    domain.NotReadyError: 409,
    domain.JobFailedError: 422,
    domain.UploadError: 400,
    domain.TooLargeError: 413,
    domain.NotMultipartError: 415,
    domain.MissingPartError: 422,
}


def _classes(module: object, base: type[Exception]) -> list[type[Exception]]:
    return [c for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, base) and c is not base]  # fmt: skip


def test_every_domain_error_has_its_status() -> None:
    assert set(_classes(domain, domain.ServiceError)) == set(EXPECTED)
    for cls, code in EXPECTED.items():
        assert status_for(cls("m", "h")) == code


def test_every_library_error_is_a_client_error() -> None:
    for cls in [library.PruneGraphError, *_classes(library, library.PruneGraphError)]:
        assert 400 <= status_for(cls("m")) < 500


@pytest.mark.parametrize("error", [domain.not_found("job", "j1"), domain.TooLargeError("big", "h"),
                                   domain.unfinished("j2", "running", None),
                                   domain.unfinished("j3", "failed", "bad input")])  # fmt: skip
def test_the_response_says_what_and_what_to_do(error: domain.ServiceError) -> None:
    app = FastAPI()
    install(app)

    @app.get("/boom")
    def boom() -> None:
        raise error

    r = TestClient(app).get("/boom")
    assert r.status_code == status_for(error)
    assert r.json() == {"error": error.message, "hint": error.hint} and error.hint
    assert (r.headers.get("connection") == "close") == isinstance(error, domain.TooLargeError)


def test_no_http_error_type_outside_the_api() -> None:
    """Only service/api/ raises or builds HTTP errors; the rest raises domain errors."""
    root = Path(service.__file__).parent
    http_error = re.compile(r"\b(ApiError|HTTPException)\b")
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if p.relative_to(root).parts[0] != "api" and http_error.search(p.read_text())
    ]
    assert offenders == []
