"""The HTTP service (design §5): ``create_app(settings)`` builds it; nothing runs at import.

Run with ``uvicorn --factory service.main:main``; settings come from ``PRUNEGRAPH_*``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import secrets
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from service.api import errors, jobs, limits, pagination
from service.api.bodies import BodyLimits
from service.api.checkpoints import (
    ActivationsOut,
    CheckpointOut,
    CheckpointPage,
    delete_checkpoint,
    list_checkpoints,
    upload_activations,
    upload_checkpoint,
)
from service.api.errors import ApiError
from service.api.jobs import JobOut, JobPage, _job_out, job_result, list_jobs, own_job, submit
from service.jobs.compensation import SIDECAR_MEDIA_TYPE, sidecar_response
from service.jobs.worker import JobRunner
from service.settings import Settings
from service.store import logins
from service.store.db import init_db
from service.store.files import CheckpointStore, clean_stale

ANONYMOUS = "anonymous"


class State:
    """Everything a request needs; built in the lifespan, stored on ``app.state.pg``."""

    def __init__(self, settings: Settings, clock: limits.Clock = time.monotonic) -> None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.tokens = settings.token_users()
        self.rate = limits.RateLimiter(settings.rate_limit, clock)
        self.auth_failures = limits.RateLimiter(settings.auth_failure_limit, clock)
        self.store = CheckpointStore(settings.data_dir)
        self.activations = CheckpointStore(settings.data_dir, "activations")
        self.sidecars = CheckpointStore(settings.data_dir, "sidecars")  # compensated plans' folds
        self.engine, self.sessions = init_db(settings.db_url())
        self.runner = JobRunner(
            settings.db_url(),
            self.sessions,
            settings.workers,
            settings.cache_dir(),
            settings.job_lease_s,
            self.store.path,
            self.activations.root,
            settings.dask_scheduler,
            sidecar_dir=self.sidecars.root,
        )


def _state(request: Request) -> State:
    state: State = request.app.state.pg
    return state


def _user(request: Request, state: Annotated[State, Depends(_state)]) -> str:
    """The caller's user name; 401 without a known token, 429 past the rate limits."""
    user = _authenticated(request, state)
    wait = state.rate.take(user)
    if wait is not None:
        raise limits.rate_limited(wait)
    return user


def _authenticated(request: Request, state: State) -> str:
    if not state.tokens:
        return ANONYMOUS
    address = request.client.host if request.client is not None else ""
    wait = state.auth_failures.blocked(address)
    if wait is not None:
        raise limits.auth_blocked(wait)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    user = None
    if scheme.lower() != "bearer" and request.method in ("GET", "HEAD"):
        # the dashboard's browser sends its login's session cookie (service.store.logins); only for
        # reads, so that another site cannot make a logged-in browser change anything (no CSRF)
        cookie = request.cookies.get(logins.SESSION_COOKIE, "")
        user = logins.user_of(state.sessions, cookie, set(state.tokens.values()))
        token = ""
    elif scheme.lower() != "bearer":
        token = ""
    for known, name in state.tokens.items():
        if token and secrets.compare_digest(known.encode(), token.strip().encode()):
            user = name
    if user is None:
        if token:  # a wrong token (a guess): a missing or expired login session is not
            state.auth_failures.take(address)
        raise ApiError(
            401,
            "missing or invalid bearer token",
            "Send the header 'Authorization: Bearer <token>' with a token the server knows.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user


StateDep = Annotated[State, Depends(_state)]
UserDep = Annotated[str, Depends(_user)]


# ---- the app -------------------------------------------------------------------------------

_MULTIPART_FILE = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}},
            }
        }
    },
}


Limit = Annotated[int, Query(ge=1, le=pagination.MAX_LIMIT, description="items per page")]
Cursor = Annotated[str | None, Query(description="next_cursor of the previous page")]
DEFAULT = pagination.DEFAULT_LIMIT


async def _clean_temp_files(state: State) -> None:
    """Remove the temp files of crashed uploads now and every few minutes (any replica's)."""
    while True:
        await run_in_threadpool(clean_stale, state.store.tmp)
        await asyncio.sleep(max(state.settings.upload_idle_s, 60.0))


def create_app(settings: Settings | None = None, clock: limits.Clock = time.monotonic) -> FastAPI:
    """The app; ``clock`` (seconds) drives the rate limits (tests step a fake one)."""
    cfg = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = State(cfg, clock)
        app.state.pg = state
        clean_stale(state.store.tmp)
        cleaner = asyncio.get_running_loop().create_task(_clean_temp_files(state))
        state.runner.start()
        # the first upload needs torch to validate a .pt file: import it now, in the background,
        # so the server answers at once and that upload does not wait for the import
        threading.Thread(
            target=importlib.import_module, args=("service.ingest.checkpoint",), daemon=True
        ).start()
        try:
            yield
        finally:
            cleaner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cleaner
            state.runner.shutdown()
            state.engine.dispose()

    # /docs and /openapi.json: offline and behind the auth setting (service.api.apidocs)
    app = FastAPI(
        title="prunegraph",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    errors.install(app)
    app.add_middleware(BodyLimits, max_json_bytes=cfg.max_json_bytes, idle_s=cfg.upload_idle_s)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/checkpoints", status_code=201, openapi_extra={"requestBody": _MULTIPART_FILE})
    async def post_checkpoint(request: Request, state: StateDep, user: UserDep) -> CheckpointOut:
        return await upload_checkpoint(state, request, user)

    @app.post(
        "/v1/checkpoints/{checkpoint_id}/activations",
        status_code=201,
        openapi_extra={"requestBody": _MULTIPART_FILE},
    )
    async def post_activations(
        checkpoint_id: str, request: Request, state: StateDep, user: UserDep
    ) -> ActivationsOut:
        return await upload_activations(state, request, user, checkpoint_id)

    @app.get("/v1/checkpoints")
    def get_checkpoints(
        state: StateDep, user: UserDep, limit: Limit = DEFAULT, cursor: Cursor = None
    ) -> CheckpointPage:
        """The caller's checkpoints, newest first, a page at a time."""
        return list_checkpoints(state, user, limit, cursor)

    @app.delete("/v1/checkpoints/{checkpoint_id}", status_code=204)
    def del_checkpoint(checkpoint_id: str, state: StateDep, user: UserDep) -> Response:
        delete_checkpoint(state, checkpoint_id, user)
        return Response(status_code=204)

    @app.post("/v1/jobs", status_code=201, openapi_extra={"requestBody": jobs.JOB_BODY})
    async def post_job(request: Request, state: StateDep, user: UserDep) -> JobOut:
        """Submit a job: its JSON, or multipart with the JSON in ``request`` and a large
        manifest as the file ``manifest``."""
        return await submit(state, request, user)

    @app.get("/v1/jobs")
    def get_jobs(
        state: StateDep, user: UserDep, limit: Limit = DEFAULT, cursor: Cursor = None
    ) -> JobPage:
        """The caller's jobs as summaries, newest first, a page at a time."""
        return list_jobs(state, user, limit, cursor)

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str, state: StateDep, user: UserDep) -> JobOut:
        return _job_out(own_job(state, job_id, user))

    @app.get("/v1/jobs/{job_id}/report")
    def get_report(job_id: str, state: StateDep, user: UserDep) -> Response:
        return job_result(state, job_id, user, "report")

    @app.get("/v1/jobs/{job_id}/plan")
    def get_plan(job_id: str, state: StateDep, user: UserDep) -> Response:
        return job_result(state, job_id, user, "plan")

    @app.get(
        "/v1/jobs/{job_id}/plan/compensation",
        response_class=Response,
        responses={200: {"content": {SIDECAR_MEDIA_TYPE: {}}}},
    )
    def get_plan_compensation(job_id: str, state: StateDep, user: UserDep) -> Response:
        """The compensated plan's sidecar (safetensors fold matrices; the plan pins its
        sha256): apply_plan folds it."""
        return sidecar_response(state, job_id, user)

    jobs.document_job_body(app)
    from service.dashboard import routes  # the pages (they import this module, so not at the top)

    routes.install(app)
    return app


def main() -> FastAPI:
    """Factory for ``uvicorn --factory service.main:main``."""
    return create_app(Settings())


__all__ = ["create_app", "main"]
