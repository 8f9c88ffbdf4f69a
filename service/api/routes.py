"""The API's routes: health, checkpoints (and their activations), jobs and their results.

The operations behind them live in :mod:`service.api.checkpoints` and :mod:`service.api.jobs`;
the request context (state, caller) in :mod:`service.api.deps`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from graphs.contracts.jobs import JobStatus
from service.api import pagination
from service.api.checkpoints import (
    delete_checkpoint,
    list_checkpoints,
    upload_activations,
    upload_checkpoint,
)
from service.api.deps import StateDep, UserDep
from service.api.jobs import (
    JOB_BODY,
    SIDECAR_MEDIA_TYPE,
    job_result,
    list_jobs,
    own_job,
    sidecar_response,
    submit,
)
from service.api.schemas import ActivationsOut, CheckpointOut, CheckpointPage, JobPage, job_status

__all__ = ["router"]

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

router = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.post("/v1/checkpoints", status_code=201, openapi_extra={"requestBody": _MULTIPART_FILE})
async def post_checkpoint(request: Request, state: StateDep, user: UserDep) -> CheckpointOut:
    return await upload_checkpoint(state, request, user)


@router.post(
    "/v1/checkpoints/{checkpoint_id}/activations",
    status_code=201,
    openapi_extra={"requestBody": _MULTIPART_FILE},
)
async def post_activations(
    checkpoint_id: str, request: Request, state: StateDep, user: UserDep
) -> ActivationsOut:
    return await upload_activations(state, request, user, checkpoint_id)


@router.get("/v1/checkpoints")
def get_checkpoints(
    state: StateDep, user: UserDep, limit: Limit = DEFAULT, cursor: Cursor = None
) -> CheckpointPage:
    """The caller's checkpoints, newest first, a page at a time."""
    return list_checkpoints(state, user, limit, cursor)


@router.delete("/v1/checkpoints/{checkpoint_id}", status_code=204)
def del_checkpoint(checkpoint_id: str, state: StateDep, user: UserDep) -> Response:
    delete_checkpoint(state, checkpoint_id, user)
    return Response(status_code=204)


@router.post("/v1/jobs", status_code=201, openapi_extra={"requestBody": JOB_BODY})
async def post_job(request: Request, state: StateDep, user: UserDep) -> JobStatus:
    """Submit a job: its JSON, or multipart with the JSON in ``request`` and a large
    manifest as the file ``manifest``."""
    return await submit(state, request, user)


@router.get("/v1/jobs")
def get_jobs(
    state: StateDep, user: UserDep, limit: Limit = DEFAULT, cursor: Cursor = None
) -> JobPage:
    """The caller's jobs as summaries, newest first, a page at a time."""
    return list_jobs(state, user, limit, cursor)


@router.get("/v1/jobs/{job_id}")
def get_job(job_id: str, state: StateDep, user: UserDep) -> JobStatus:
    return job_status(own_job(state, job_id, user))


@router.get("/v1/jobs/{job_id}/report")
def get_report(job_id: str, state: StateDep, user: UserDep) -> Response:
    return job_result(state, job_id, user, "report")


@router.get("/v1/jobs/{job_id}/plan")
def get_plan(job_id: str, state: StateDep, user: UserDep) -> Response:
    return job_result(state, job_id, user, "plan")


@router.get(
    "/v1/jobs/{job_id}/plan/compensation",
    response_class=Response,
    responses={200: {"content": {SIDECAR_MEDIA_TYPE: {}}}},
)
def get_plan_compensation(job_id: str, state: StateDep, user: UserDep) -> Response:
    """The compensated plan's sidecar (safetensors fold matrices; the plan pins its
    sha256): apply_plan folds it."""
    return sidecar_response(state, job_id, user)
