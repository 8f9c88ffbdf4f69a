"""The jobs' operations behind the routes: submit (JSON or multipart), list, show, results, and
a compensated plan's sidecar. The request is :class:`graphs.contracts.jobs.JobRequest`, the model
the client sends; the answer :class:`graphs.contracts.jobs.JobStatus` (:mod:`service.api.schemas`).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from pydantic import ValidationError
from sqlalchemy import select

from graphs.contracts.jobs import JobRequest, JobStatus
from graphs.plan import PruningPlan
from service.api import limits, pagination
from service.api.errors import ApiError
from service.api.schemas import JobPage, JobSummary, job_status, request_summary, summary_of
from service.errors import not_found, unfinished
from service.store.db import QUEUED, ActivationsRow, CheckpointRow, JobRow

if TYPE_CHECKING:
    from service.api.deps import State

SIDECAR_MEDIA_TYPE = "application/octet-stream"


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


def create_job(state: State, body: JobRequest, user: str) -> JobStatus:
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
    return job_status(row)


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


async def submit(state: State, request: Request, user: str) -> JobStatus:
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
        req, _ = request_summary(summary, full.get(job_id))
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
        raise unfinished(job_id, row.status, row.error)
    text = row.report_json if kind == "report" else row.plan_json
    if text is None:
        raise ApiError(
            404,
            f"job {job_id} has no plan: it was submitted without a target",
            'Submit a job with a target, e.g. "target": {"params": 0.5}.',
        )
    return Response(text, media_type="application/json")


def sidecar_response(state: State, job_id: str, user: str) -> FileResponse:
    """``GET /v1/jobs/{id}/plan/compensation``: the sidecar the job's plan pins."""
    plan = PruningPlan.model_validate_json(bytes(job_result(state, job_id, user, "plan").body))
    comp = plan.compensation
    if comp is None:
        raise ApiError(
            404,
            f"job {job_id}'s plan carries no compensation",
            "Compensated plans need activations with second-moment statistics "
            "(clients.capture_activations records them) and a manifest.",
        )
    path = state.sidecars.path(comp.sidecar_sha256)
    if not path.is_file():
        raise ApiError(
            404,
            f"the sidecar of job {job_id}'s plan (sha256 {comp.sidecar_sha256[:12]}…) is gone",
            "Submit the job again to recompute it.",
        )
    return FileResponse(
        path,
        media_type=SIDECAR_MEDIA_TYPE,
        filename=f"{job_id}.fold.safetensors",
        headers={"X-Sidecar-SHA256": comp.sidecar_sha256},
    )
