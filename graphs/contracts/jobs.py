"""The job contracts: what a client sends to ``POST /v1/jobs`` and reads from ``GET /v1/jobs/{id}``.

:class:`JobRequest` is the request body the service validates (and stores whole, as
``model_dump_json()``); a client builds the same model and sends it, so a bad request fails
the same way on either side. :class:`JobStatus` is the service's answer about one job, and what
the client parses it into.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from graphs.errors import InvalidInputError, PruneGraphError
from graphs.manifest import Manifest
from graphs.options import DEFAULT_EPSILON, AnalysisOptions, check_features, check_methods
from graphs.plan import AllocationRule, Constraints, PlanMethod, Target
from graphs.report import ALL_METHODS

__all__ = [
    "FINISHED",
    "INVALID_REQUEST_HINT",
    "MAX_INPUTS",
    "MAX_INPUT_DIM",
    "MAX_INPUT_ELEMENTS",
    "MAX_INPUT_RANK",
    "CompensationOptions",
    "JobRequest",
    "JobStatus",
    "check_input_shapes",
    "invalid_request_message",
]

MAX_INPUTS = 16
MAX_INPUT_RANK = 8
MAX_INPUT_DIM = 2**31 - 1
MAX_INPUT_ELEMENTS = 2**40
"""Per input: shapes are arithmetic only, but products must stay sane."""
FINISHED = ("done", "failed")
"""The statuses a job never leaves."""


def check_input_shapes(shapes: Sequence[Sequence[int]]) -> list[list[int]]:
    """The shapes as lists, checked: 1 to 16 inputs of rank 1 to 8, every dim at least 1.

    Raises:
        InvalidInputError: outside those bounds.
    """
    hint = "Give one shape per model input, e.g. 1,3,224,224, every dim at least 1."
    if not 1 <= len(shapes) <= MAX_INPUTS:
        raise InvalidInputError(f"input shapes: give 1 to {MAX_INPUTS} shapes", hint=hint)
    out = []
    for shape in shapes:
        dims = [int(d) for d in shape]
        if not 1 <= len(dims) <= MAX_INPUT_RANK:
            raise InvalidInputError(
                f"input shape {dims} must have 1 to {MAX_INPUT_RANK} dims", hint=hint
            )
        if any(not 1 <= d <= MAX_INPUT_DIM for d in dims) or math.prod(dims) > MAX_INPUT_ELEMENTS:
            raise InvalidInputError(
                f"input shape {dims} has a dim below 1 or is too large", hint=hint
            )
        out.append(dims)
    return out


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
    crossfit: bool = Field(
        True,
        exclude_if=lambda v: v is True,
        description="with held-out statistics in the activations file (a part of the "
        "calibration data, clients.capture_activations(..., holdout_every=...)): cross-fit the "
        "error curves of plans and of functional redundancy (folds fitted on one part, their "
        "error measured on the other); false: in-sample",
    )


class JobRequest(CompensationOptions):
    """The body of ``POST /v1/jobs``: analyse a checkpoint (and plan it when ``target`` is set)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint_id: str = Field(description="the id (sha256) returned by POST /v1/checkpoints")
    methods: list[str] = Field(default_factory=lambda: [str(m) for m in ALL_METHODS])
    seed: int = Field(0, ge=0, le=2**32 - 1)
    target: Target | None = Field(None, description='{"flops": 0.5} or {"params": 0.5}')
    plan_method: PlanMethod = "mrp"
    manifest: Manifest | None = None
    options: AnalysisOptions = Field(
        default_factory=AnalysisOptions, description="method parameters (alpha, min_explained, ...)"
    )
    constraints: Constraints = Field(
        default_factory=Constraints, description="planning constraints (min_channels, ...)"
    )
    step: float = Field(
        0.05, gt=0, description="filters per greedy step: an integer, or a fraction of a group"
    )
    activations_id: str | None = Field(
        None,
        description="feature maps uploaded with POST /v1/checkpoints/{id}/activations: needed "
        "by the ci method and by options.vectors = activations (second moments: compensation)",
    )
    input_shape: list[list[int]] | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="ONNX models: one shape per graph input, e.g. [[1, 3, 64, 256]] (a single "
        "shape [1, 3, 64, 256] is taken for a one-input model); makes symbolic dims concrete "
        "so that FLOPs and a manifest are derived from the graph",
    )

    @field_validator("input_shape", mode="before")
    @classmethod
    def _input_shape(cls, v: Any) -> Any:
        if isinstance(v, list) and v and all(isinstance(d, int) for d in v):
            v = [v]  # one input's shape
        if isinstance(v, list) and all(
            isinstance(s, list) and all(isinstance(d, int) for d in s) for s in v
        ):
            try:
                return check_input_shapes(v)
            except PruneGraphError as e:
                raise ValueError(f"{e.message}. {e.hint}") from None
        return v

    @model_validator(mode="after")
    def _one_source_of_shapes(self) -> JobRequest:
        if self.input_shape is not None and self.manifest is not None:
            raise ValueError("give either manifest or input_shape, not both")
        return self

    @model_validator(mode="after")
    def _needs_activations(self) -> JobRequest:
        if self.activations_id is None:
            try:
                check_features(
                    [*self.methods, *([self.plan_method] if self.target else [])],
                    self.options,
                    None,
                )
            except PruneGraphError as e:
                raise ValueError(f"{e.message}. Upload them and pass activations_id.") from None
        return self

    @field_validator("step")
    @classmethod
    def _step(cls, v: float) -> float:
        if not (v >= 1 and float(v).is_integer()) and not 0 < v < 1:
            raise ValueError("step must be an integer >= 1 or a fraction in (0, 1)")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        try:
            return check_methods(v)
        except PruneGraphError as e:
            raise ValueError(f"{e.message}. {e.hint}") from None


class JobStatus(BaseModel):
    """Where a job stands: ``queued`` → ``running`` → ``done`` | ``failed``, with its request
    (without the manifest) and what it produced.

    Frozen; fields the client does not know yet are ignored, so an older client reads a newer
    service's answer.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

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

    @property
    def finished(self) -> bool:
        """Whether the job is done or failed (it will not change any more)."""
        return self.status in FINISHED


INVALID_REQUEST_HINT = "See the request schema at /docs."


def invalid_request_message(errors: Sequence[Mapping[str, Any]]) -> str:
    """The 422 message for a request that fails validation (pydantic's ``errors()``): where and
    what of the first error, in the same words on the server and in the client."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()))
    msg = str(first.get("msg", "invalid request")).replace("Value error, ", "")
    return f"invalid request at {where}: {msg}"
