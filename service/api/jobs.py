"""The jobs' operations behind the routes: submit (JSON or multipart), list, show, results.

A job's request is stored whole (``request_json``, read by the worker) and as a summary without
the manifest (``summary_json``): what ``GET /v1/jobs/{id}`` echoes and what lists show, so that a
large manifest is never sent back or parsed to answer them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import select

from service.api import limits, pagination
from service.api.errors import ApiError, not_found
from service.jobs.tasks import JobRequest
from service.store.db import QUEUED, ActivationsRow, CheckpointRow, JobRow

if TYPE_CHECKING:
    from service.main import State


class JobOut(BaseModel):
    id: str
    status: str
    progress: float
    error: str | None
    checkpoint_id: str
    request: dict[str, Any] = Field(description="the job's request, without its manifest")
    has_manifest: bool = False
    has_plan: bool
    cache_hits: int = Field(description="per-group results reused from earlier jobs")
    cache_misses: int = Field(description="per-group results computed by this job")
    created_at: float
    updated_at: float


class JobSummary(BaseModel):
    """A job in a list: no request, report or plan (GET /v1/jobs/{id} has more)."""

    id: str
    status: str
    progress: float
    error: str | None
    checkpoint_id: str
    methods: list[str]
    target: dict[str, Any] | None
    plan_method: str | None
    has_plan: bool
    created_at: float
    updated_at: float


class JobPage(BaseModel):
    items: list[JobSummary] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as cursor for the next page; null: last")


JOB_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["request"],
                "properties": {
                    "request": {"type": "string", "description": "the job's JSON"},
                    "manifest": {
                        "type": "string",
                        "format": "binary",
                        "description": "a large manifest as a JSON file (instead of the field)",
                    },
                },
            }
        },
    },
}
"""``POST /v1/jobs``'s body in the API description (the route reads the request itself)"""


def document_job_body(app: FastAPI) -> None:
    """Put :class:`JobRequest`'s schema (and those it uses) in the API description's
    components, where :data:`JOB_BODY` refers to it."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        if "JobRequest" not in components:
            job = JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(job.pop("$defs", {}))
            components["JobRequest"] = job
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def summary_of(request: JobRequest) -> str:
    """The stored summary of a request: everything but the manifest, and whether it had one."""
    short = request.model_dump(mode="json", exclude={"manifest"})
    return json.dumps({"request": short, "has_manifest": request.manifest is not None})


def _summary(row_summary: str | None, request_json: str | None) -> tuple[dict[str, Any], bool]:
    """The request without its manifest, and whether it had one."""
    if row_summary is not None:
        stored = json.loads(row_summary)
        return dict(stored["request"]), bool(stored["has_manifest"])
    full: dict[str, Any] = json.loads(request_json or "{}")  # a job from before summaries
    return full, full.pop("manifest", None) is not None


def _job_out(row: JobRow) -> JobOut:
    request, has_manifest = _summary(
        row.summary_json, row.request_json if row.summary_json is None else None
    )
    return JobOut(
        id=row.id,
        status=row.status,
        progress=row.progress,
        error=row.error,
        checkpoint_id=row.checkpoint_id,
        request=request,
        has_manifest=has_manifest,
        has_plan=row.plan_json is not None,
        cache_hits=row.cache_hits or 0,
        cache_misses=row.cache_misses or 0,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def create_job(state: State, body: JobRequest, user: str) -> JobOut:
    with state.sessions.begin() as s:
        if s.get(CheckpointRow, (body.checkpoint_id, user)) is None:
            raise not_found("checkpoint", body.checkpoint_id)
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
        limits.check_jobs(s, user, state.settings.quota_jobs)
        now = time.time()
        row = JobRow(
            id=uuid.uuid4().hex,
            owner=user,
            checkpoint_id=body.checkpoint_id,
            request_json=body.model_dump_json(),
            summary_json=summary_of(body),
            status=QUEUED,
            progress=0.0,
            created_at=now,
            updated_at=now,
            **state.runner.lease(),
        )
        s.add(row)
    state.runner.submit(row.id, body.checkpoint_id)
    return _job_out(row)


def _validated(text: bytes | str, manifest: bytes | None) -> JobRequest:
    """The job request from its JSON (and a manifest file); 422 like any invalid request."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("the request is not a JSON object")
        if manifest is not None:
            if data.get("manifest") is not None:
                raise ValueError("the manifest is given twice: in the request and as a file")
            data["manifest"] = json.loads(manifest)
        return JobRequest.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None
    except ValueError as e:  # invalid JSON (json.JSONDecodeError is a ValueError)
        raise ApiError(422, f"invalid job request: {e}", "Send a JSON object; see /docs.") from None


async def submit(state: State, request: Request, user: str) -> JobOut:
    """``POST /v1/jobs``: a JSON body, or multipart with ``request`` (JSON) and ``manifest``."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "multipart/form-data":
        body = await request.body()  # bounded by service.api.bodies
        job = await run_in_threadpool(_validated, body, None)
        return await run_in_threadpool(create_job, state, job, user)
    upload = await state.store.receive(
        ctype,
        request.headers.get("content-length"),
        request.stream(),
        state.settings.max_upload_bytes,
        file_field="manifest",
        required=False,
        keep=frozenset({"request"}),
        field_limit=state.settings.max_json_bytes,
    )
    with upload:
        if "request" not in upload.fields:
            raise ApiError(
                422,
                "the multipart job has no field 'request'",
                "Send the job's JSON in the field 'request' (and the manifest in 'manifest').",
            )
        manifest = upload.tmp_path.read_bytes() if upload.filename else None
        job = await run_in_threadpool(_validated, upload.fields["request"], manifest)
    return await run_in_threadpool(create_job, state, job, user)


def own_job(state: State, job_id: str, user: str) -> JobRow:
    with state.sessions() as s:
        row = s.get(JobRow, job_id)
    if row is None or row.owner != user:
        raise not_found("job", job_id)
    return row


_LISTED = (
    JobRow.id, JobRow.status, JobRow.progress, JobRow.error, JobRow.checkpoint_id,
    JobRow.summary_json, JobRow.plan_json.is_not(None), JobRow.created_at, JobRow.updated_at,
)  # fmt: skip


def list_jobs(
    state: State, user: str, limit: int = pagination.DEFAULT_LIMIT, cursor: str | None = None
) -> JobPage:
    """One page of the user's jobs, newest first, as summaries."""
    query = pagination.page(
        select(*_LISTED).where(JobRow.owner == user), JobRow.created_at, JobRow.id, limit, cursor
    )
    with state.sessions() as s:
        rows = s.execute(query).all()
        old = {r[0] for r in rows if r[5] is None}  # jobs from before summaries
        full = dict(
            s.execute(select(JobRow.id, JobRow.request_json).where(JobRow.id.in_(old))).all()
        ) if old else {}  # fmt: skip
    items = []
    for job_id, status, progress, error, ckpt, summary, has_plan, created, updated in rows[:limit]:
        req, _ = _summary(summary, full.get(job_id))
        items.append(JobSummary(
            id=job_id, status=status, progress=progress, error=error, checkpoint_id=ckpt,
            methods=req.get("methods") or [], target=req.get("target"),
            plan_method=req.get("plan_method"), has_plan=bool(has_plan),
            created_at=created, updated_at=updated,
        ))  # fmt: skip
    last = rows[limit - 1] if len(rows) > limit else None
    return JobPage(items=items, next_cursor=pagination.encode(last[7], last[0]) if last else None)


def recent_jobs(state: State, user: str, n: int = 200) -> list[JobSummary]:
    """The user's ``n`` newest jobs (the dashboard's lists)."""
    return list_jobs(state, user, limit=n).items


def job_result(state: State, job_id: str, user: str, kind: str) -> Response:
    row = own_job(state, job_id, user)
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
