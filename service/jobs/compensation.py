"""Compensated plans and functional redundancy in jobs (design §8).

A job whose activations file holds second-moment statistics (``gram/<module>``, see
:mod:`service.ingest.statistics`) plans with them (:func:`graphs.planner.plan_layers` with
``stats``): least-squares folds by default (``compensation``), counts by ``allocation``; its report
gains each group's functional redundancy (:mod:`graphs.functional_report`). Statistics need the
model's manifest; without one the job plans and reports as before.

A compensated plan's sidecar (the fold matrices, :mod:`graphs.fold`) is stored by content
(``data_dir/sidecars/<sha256>``, written atomically by the job's worker) and served at
``GET /v1/jobs/{id}/plan/compensation``; the plan pins its sha256.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from graphs.error_allocation import AllocationRule
from graphs.features import Activations
from graphs.fold import sidecar_sha256
from graphs.functional import DEFAULT_EPSILON
from graphs.layers import LayerWeights
from graphs.manifest import Manifest
from graphs.plan import PruningPlan
from graphs.report import Report
from service.api.errors import ApiError
from service.store.cache import write_atomically

if TYPE_CHECKING:
    from service.main import State

SIDECAR_MEDIA_TYPE = "application/octet-stream"


class CompensationOptions(BaseModel):
    """The job's options for plans made with activation statistics (left out of the stored
    request when they are the defaults, so older requests read the same)."""

    compensation: bool = Field(
        True,
        exclude_if=lambda v: v is True,
        description="with second-moment statistics in the activations (and a manifest): fold "
        "the removed channels into the kept ones (the sidecar is at GET "
        "/v1/jobs/{id}/plan/compensation); false: the same channels, no folds",
    )
    allocation: AllocationRule | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="with statistics: how many channels each group loses (functional, the "
        "default; uniform; marginal; method)",
    )
    epsilon: float = Field(
        DEFAULT_EPSILON,
        ge=0,
        allow_inf_nan=False,
        exclude_if=lambda v: v == DEFAULT_EPSILON,
        description="functional redundancy: the relative consumer-output error allowed",
    )


def read_job_capture(
    path: Path | None, activations_id: str | None, layers: Sequence[LayerWeights]
) -> tuple[Activations | None, dict[str, np.ndarray] | None]:
    """Feature maps and statistics of a job's activations, checked against its layers (None
    for what the file does not hold)."""
    if path is None:
        return None, None
    from service.ingest.activations import check_capture, read_capture

    capture = read_capture(path, name=f"activations {activations_id}")
    check_capture(capture, layers)
    return (capture.maps or None), (capture.statistics or None)


def with_figures(
    report: Report,
    layers: Sequence[LayerWeights],
    manifest: Manifest | None,
    stats: dict[str, np.ndarray] | None,
    epsilon: float,
) -> Report:
    """``report`` with each group's functional redundancy when there are statistics and a
    manifest (:mod:`graphs.functional_report`); else ``report`` as it is."""
    if stats is None or manifest is None:
        return report
    from graphs.functional_report import functional_figures, with_functional

    return with_functional(report, functional_figures(layers, manifest, stats, epsilon=epsilon))


def store_sidecar(directory: str, plan: PruningPlan) -> None:
    """Write a compensated plan's sidecar to ``directory/<sha256>`` (atomically; bytes that
    are there already are kept). Nothing without compensation or a directory."""
    if plan.compensation is None or not directory:
        return
    from graphs.compensated import plan_sidecar

    data = plan_sidecar(plan)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    target = root / sidecar_sha256(data)
    if target.is_file() and target.stat().st_size == len(data):
        return
    write_atomically(target, data)


def sidecar_response(state: State, job_id: str, user: str) -> FileResponse:
    """``GET /v1/jobs/{id}/plan/compensation``: the sidecar the job's plan pins."""
    from service.api.jobs import job_result

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
