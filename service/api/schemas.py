"""The API's response models (the job status itself is :class:`graphs.contracts.jobs.JobStatus`,
the one model both the service and the client use) and how they are made from database rows.

A job's request is stored whole (``request_json``, read by the worker) and as a summary without
the manifest (``summary_json``): what ``GET /v1/jobs/{id}`` echoes and what lists show, so that a
large manifest is never sent back or parsed to answer them.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from graphs.contracts.jobs import JobRequest, JobStatus
from service.store.db import CheckpointRow, JobRow


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


class CheckpointOut(BaseModel):
    id: str
    format: str
    size_bytes: int
    n_layers: int
    skipped: list[dict[str, str]]


class CheckpointSummary(BaseModel):
    id: str
    format: str
    size_bytes: int
    n_layers: int
    n_skipped: int
    created_at: float


class CheckpointPage(BaseModel):
    items: list[CheckpointSummary] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as cursor for the next page; null: last")


class ActivationsOut(BaseModel):
    id: str = Field(description="sha256 of the activations file; pass it as activations_id")
    checkpoint_id: str
    n_layers: int
    n_samples: int


def checkpoint_out(row: CheckpointRow) -> CheckpointOut:
    return CheckpointOut(
        id=row.id,
        format=row.format,
        size_bytes=row.size_bytes,
        n_layers=row.n_layers,
        skipped=json.loads(row.skipped_json),
    )


def summary_of(request: JobRequest) -> str:
    """The stored summary of a request: everything but the manifest, and whether it had one."""
    short = request.model_dump(mode="json", exclude={"manifest"})
    return json.dumps({"request": short, "has_manifest": request.manifest is not None})


def request_summary(
    row_summary: str | None, request_json: str | None
) -> tuple[dict[str, Any], bool]:
    """The request without its manifest, and whether it had one."""
    if row_summary is not None:
        stored = json.loads(row_summary)
        return dict(stored["request"]), bool(stored["has_manifest"])
    full: dict[str, Any] = json.loads(request_json or "{}")  # a job from before summaries
    return full, full.pop("manifest", None) is not None


def job_status(row: JobRow) -> JobStatus:
    """What ``GET /v1/jobs/{id}`` answers about the job in ``row``."""
    request, has_manifest = request_summary(
        row.summary_json, row.request_json if row.summary_json is None else None
    )
    return JobStatus(
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
