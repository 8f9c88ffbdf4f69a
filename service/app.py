"""The HTTP service (design §5): ``create_app(settings)`` builds it; nothing runs at import.

Run with ``uvicorn --factory service.app:main``; settings come from ``PRUNEGRAPH_*``.
"""

from __future__ import annotations

import importlib
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import errors
from service.db import QUEUED, ActivationsRow, CheckpointRow, JobRow, init_db
from service.errors import ApiError, not_found
from service.jobs import JobRequest
from service.runner import JobRunner
from service.settings import Settings
from service.storage import CheckpointStore, Upload

ANONYMOUS = "anonymous"
TOKEN_COOKIE = "prunegraph_token"
"""Cookie the dashboard stores the token in (entered once); the API accepts it like a header."""


class CheckpointOut(BaseModel):
    id: str
    format: str
    size_bytes: int
    n_layers: int
    skipped: list[dict[str, str]]


class ActivationsOut(BaseModel):
    id: str = Field(description="sha256 of the activations file; pass it as activations_id")
    checkpoint_id: str
    n_layers: int
    n_samples: int


class JobOut(BaseModel):
    id: str
    status: str
    progress: float
    error: str | None
    checkpoint_id: str
    request: dict[str, Any]
    has_plan: bool
    cache_hits: int = Field(description="per-group results reused from earlier jobs")
    cache_misses: int = Field(description="per-group results computed by this job")
    created_at: float
    updated_at: float


class State:
    """Everything a request needs; built in the lifespan, stored on ``app.state.pg``."""

    def __init__(self, settings: Settings) -> None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.tokens = settings.token_users()
        self.store = CheckpointStore(settings.data_dir)
        self.activations = CheckpointStore(settings.data_dir, "activations")
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
        )


def _state(request: Request) -> State:
    state: State = request.app.state.pg
    return state


def _user(request: Request, state: Annotated[State, Depends(_state)]) -> str:
    if not state.tokens:
        return ANONYMOUS
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" and request.method in ("GET", "HEAD"):
        # the dashboard's browser sends the token as a cookie; only for reads, so that another
        # site cannot make a logged-in browser change anything (no CSRF)
        token = request.cookies.get(TOKEN_COOKIE, "")
    elif scheme.lower() != "bearer":
        token = ""
    user = None
    for known, name in state.tokens.items():
        if token and secrets.compare_digest(known.encode(), token.strip().encode()):
            user = name
    if user is None:
        raise ApiError(
            401,
            "missing or invalid bearer token",
            "Send the header 'Authorization: Bearer <token>' with a token the server knows.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user


StateDep = Annotated[State, Depends(_state)]
UserDep = Annotated[str, Depends(_user)]


# ---- operations (one per route) -------------------------------------------------------------


def _checkpoint_out(row: CheckpointRow) -> CheckpointOut:
    skipped = json.loads(row.skipped_json)
    return CheckpointOut(
        id=row.id,
        format=row.format,
        size_bytes=row.size_bytes,
        n_layers=row.n_layers,
        skipped=skipped,
    )


def _validate_and_store(state: State, upload: Upload, user: str) -> CheckpointOut:
    from service.ingest import read_checkpoint  # torch is imported at first upload only

    try:
        parsed = read_checkpoint(upload.tmp_path, name=upload.filename)
    except BaseException:
        upload.tmp_path.unlink(missing_ok=True)
        raise
    state.store.commit(upload)
    row = CheckpointRow(
        id=upload.sha256,
        owner=user,
        format=parsed.info.format,
        size_bytes=upload.size,
        n_layers=len(parsed.layers),
        skipped_json=json.dumps([sk.model_dump(mode="json") for sk in parsed.skipped]),
    )
    try:
        with state.sessions.begin() as s:
            if s.get(CheckpointRow, (upload.sha256, user)) is None:
                s.add(row)
    except IntegrityError:
        pass  # the same bytes uploaded concurrently by the same user: already recorded
    return _checkpoint_out(row)


async def upload_checkpoint(state: State, request: Request, user: str) -> CheckpointOut:
    upload = await state.store.receive(
        request.headers.get("content-type"),
        request.headers.get("content-length"),
        request.stream(),
        state.settings.max_upload_bytes,
    )
    return await run_in_threadpool(_validate_and_store, state, upload, user)


def _own_checkpoint(s: Session, checkpoint_id: str, user: str) -> CheckpointRow:
    row = s.get(CheckpointRow, (checkpoint_id, user))
    if row is None:
        raise not_found("checkpoint", checkpoint_id)
    return row


def _store_activations(
    state: State, upload: Upload, user: str, checkpoint_id: str
) -> ActivationsOut:
    from service.activations import check_capture, read_capture
    from service.ingest import read_checkpoint

    try:
        with state.sessions() as s:
            _own_checkpoint(s, checkpoint_id, user)
        capture = read_capture(upload.tmp_path, name=upload.filename or "the activations")
        parsed = read_checkpoint(
            state.store.path(checkpoint_id), name=f"checkpoint {checkpoint_id}"
        )
        check_capture(capture, parsed.layers)
    except BaseException:
        upload.tmp_path.unlink(missing_ok=True)
        raise
    state.activations.commit(upload)
    n_samples = capture.n_samples
    row = ActivationsRow(
        id=upload.sha256, owner=user, checkpoint_id=checkpoint_id,
        n_layers=len(capture.maps or capture.statistics), n_samples=n_samples,
    )  # fmt: skip
    try:
        with state.sessions.begin() as s:
            if s.get(ActivationsRow, (upload.sha256, user, checkpoint_id)) is None:
                s.add(row)
    except IntegrityError:
        pass  # the same file uploaded concurrently by the same user
    return ActivationsOut(
        id=row.id, checkpoint_id=checkpoint_id, n_layers=row.n_layers, n_samples=n_samples
    )


async def upload_activations(
    state: State, request: Request, user: str, checkpoint_id: str
) -> ActivationsOut:
    upload = await state.activations.receive(
        request.headers.get("content-type"),
        request.headers.get("content-length"),
        request.stream(),
        state.settings.max_upload_bytes,
    )
    return await run_in_threadpool(_store_activations, state, upload, user, checkpoint_id)


def delete_checkpoint(state: State, checkpoint_id: str, user: str) -> None:
    with state.sessions.begin() as s:
        s.delete(_own_checkpoint(s, checkpoint_id, user))
        s.execute(delete(JobRow).where(JobRow.checkpoint_id == checkpoint_id, JobRow.owner == user))
        acts = s.scalars(
            select(ActivationsRow.id).where(
                ActivationsRow.checkpoint_id == checkpoint_id, ActivationsRow.owner == user
            )
        ).all()
        s.execute(
            delete(ActivationsRow).where(
                ActivationsRow.checkpoint_id == checkpoint_id, ActivationsRow.owner == user
            )
        )
        s.flush()
        others = s.scalar(select(func.count()).where(CheckpointRow.id == checkpoint_id))
        unused = [
            a for a in acts
            if not s.scalar(select(func.count()).where(ActivationsRow.id == a))
        ]  # fmt: skip
    if not others:
        state.store.delete(checkpoint_id)
    for a in unused:
        state.activations.delete(a)


def _job_out(row: JobRow) -> JobOut:
    return JobOut(
        id=row.id,
        status=row.status,
        progress=row.progress,
        error=row.error,
        checkpoint_id=row.checkpoint_id,
        request=json.loads(row.request_json),
        has_plan=row.plan_json is not None,
        cache_hits=row.cache_hits or 0,
        cache_misses=row.cache_misses or 0,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def create_job(state: State, body: JobRequest, user: str) -> JobOut:
    with state.sessions.begin() as s:
        _own_checkpoint(s, body.checkpoint_id, user)
        if body.activations_id is not None:
            key = (body.activations_id, user, body.checkpoint_id)
            if s.get(ActivationsRow, key) is None:
                raise ApiError(
                    404,
                    f"activations {body.activations_id} not found for checkpoint "
                    f"{body.checkpoint_id}",
                    "Upload them with POST /v1/checkpoints/{checkpoint_id}/activations and "
                    "pass the id it returns.",
                )
        now = time.time()
        row = JobRow(
            id=uuid.uuid4().hex,
            owner=user,
            checkpoint_id=body.checkpoint_id,
            request_json=body.model_dump_json(),
            status=QUEUED,
            progress=0.0,
            created_at=now,
            updated_at=now,
            **state.runner.lease(),
        )
        s.add(row)
    state.runner.submit(row.id, body.checkpoint_id)
    return _job_out(row)


def _own_job(state: State, job_id: str, user: str) -> JobRow:
    with state.sessions() as s:
        row = s.get(JobRow, job_id)
    if row is None or row.owner != user:
        raise not_found("job", job_id)
    return row


def list_jobs(state: State, user: str) -> list[JobOut]:
    with state.sessions() as s:
        rows = s.scalars(select(JobRow).where(JobRow.owner == user).order_by(JobRow.created_at))
        return [_job_out(r) for r in rows]


def job_result(state: State, job_id: str, user: str, kind: str) -> Response:
    row = _own_job(state, job_id, user)
    if row.status != "done":
        why = f": {row.error}" if row.error else ""
        raise ApiError(
            409 if row.status != "failed" else 422,
            f"job {job_id} is {row.status}{why}",
            "Poll GET /v1/jobs/{id} until its status is done."
            if row.status != "failed"
            else "Fix the input named in the error and submit a new job.",
        )
    text = row.report_json if kind == "report" else row.plan_json
    if text is None:
        raise ApiError(
            404,
            f"job {job_id} has no plan: it was submitted without a target",
            'Submit a job with a target, e.g. "target": {"params": 0.5}.',
        )
    return Response(text, media_type="application/json")


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


def create_app(settings: Settings | None = None) -> FastAPI:
    cfg = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = State(cfg)
        app.state.pg = state
        state.runner.start()
        # the first upload needs torch to validate a .pt file: import it now, in the background,
        # so the server answers at once and that upload does not wait for the import
        threading.Thread(
            target=importlib.import_module, args=("service.ingest",), daemon=True
        ).start()
        try:
            yield
        finally:
            state.runner.shutdown()
            state.engine.dispose()

    app = FastAPI(title="prunegraph", version="1", lifespan=lifespan)
    errors.install(app)

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

    @app.delete("/v1/checkpoints/{checkpoint_id}", status_code=204)
    def del_checkpoint(checkpoint_id: str, state: StateDep, user: UserDep) -> Response:
        delete_checkpoint(state, checkpoint_id, user)
        return Response(status_code=204)

    @app.post("/v1/jobs", status_code=201)
    def post_job(body: JobRequest, state: StateDep, user: UserDep) -> JobOut:
        return create_job(state, body, user)

    @app.get("/v1/jobs")
    def get_jobs(state: StateDep, user: UserDep) -> list[JobOut]:
        return list_jobs(state, user)

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str, state: StateDep, user: UserDep) -> JobOut:
        return _job_out(_own_job(state, job_id, user))

    @app.get("/v1/jobs/{job_id}/report")
    def get_report(job_id: str, state: StateDep, user: UserDep) -> Response:
        return job_result(state, job_id, user, "report")

    @app.get("/v1/jobs/{job_id}/plan")
    def get_plan(job_id: str, state: StateDep, user: UserDep) -> Response:
        return job_result(state, job_id, user, "plan")

    from service import dashboard  # the pages (it imports this module, so not at the top)

    dashboard.install(app)
    return app


def main() -> FastAPI:
    """Factory for ``uvicorn --factory service.app:main``."""
    return create_app(Settings())


__all__ = ["create_app", "main"]
