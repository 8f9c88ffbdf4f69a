"""The job a client submits: the shared :class:`graphs.contracts.jobs.JobRequest`, built from
:meth:`clients.PruneGraphClient.submit`'s arguments, and what goes on the wire.

The client validates the request with the very model the service validates, so a bad request
is refused before anything is sent, the way the server would refuse it
(:class:`~clients.errors.InvalidRequestError`, 422, the same message). What is sent is the model
as JSON with the fields the caller gave (the server's defaults apply to the rest): the service
validates it into the same request.

Data-aware requests: feature maps that were captured (or a saved activations file that holds
some) are compared by the graph methods (``vectors="activations"``) unless the caller's options
chose ``vectors`` (:func:`data_aware_options`); whether a file holds maps is read from its header
(:func:`graphs.contracts.activations.has_maps`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from clients.errors import InvalidRequestError
from graphs.contracts import activations as activations_file
from graphs.contracts.jobs import INVALID_REQUEST_HINT, JobRequest, invalid_request_message
from graphs.manifest import Manifest
from graphs.options import AnalysisOptions
from graphs.plan import Constraints

if TYPE_CHECKING:
    from clients.activations import Activations

__all__ = [
    "MANIFEST_AS_FILE",
    "Options",
    "PlanConstraints",
    "data_aware_options",
    "has_feature_maps",
    "job_request",
    "multipart_body",
    "wire_body",
]

MANIFEST_AS_FILE = 1 << 20
"""A job's JSON above this many characters sends its manifest as a multipart file (the server
bounds JSON bodies to a few MiB)."""
Options = AnalysisOptions | Mapping[str, Any]
PlanConstraints = Constraints | Mapping[str, Any]


def job_request(
    checkpoint_id: str,
    *,
    methods: Iterable[str],
    seed: int,
    target: Mapping[str, float] | None,
    plan_method: str,
    manifest: Manifest | Mapping[str, Any] | None = None,
    options: Options | None = None,
    constraints: PlanConstraints | None = None,
    step: float | None = None,
    activations_id: str | None = None,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
    compensation: bool | None = None,
    allocation: str | None = None,
    epsilon: float | None = None,
    crossfit: bool | None = None,
) -> JobRequest:
    """The validated job request (arguments as in :meth:`clients.PruneGraphClient.submit`;
    ``None`` leaves a field to the server's default).

    Raises:
        InvalidRequestError: the request is invalid (status 422 and the server's message:
            nothing was sent).
    """
    given: dict[str, Any] = {
        "checkpoint_id": checkpoint_id,
        "methods": list(methods),
        "seed": seed,
        "target": dict(target) if target is not None else None,
        "plan_method": plan_method,
    }
    nested = {"manifest": manifest, "options": options, "constraints": constraints}
    for name, value in nested.items():
        if value is not None:
            given[name] = value if isinstance(value, BaseModel) else dict(value)
    optional = {
        "step": step,
        "activations_id": activations_id,
        "compensation": compensation,
        "allocation": allocation,
        "epsilon": epsilon,
        "crossfit": crossfit,
    }
    given.update({k: v for k, v in optional.items() if v is not None})
    if input_shape is not None:
        given["input_shape"] = [
            [int(d) for d in s] if isinstance(s, Sequence) else int(s) for s in input_shape
        ]
    try:
        return JobRequest.model_validate(given)
    except ValidationError as e:
        message = invalid_request_message(e.errors(include_url=False))
        raise InvalidRequestError(422, message, INVALID_REQUEST_HINT) from None


def wire_body(request: JobRequest) -> dict[str, Any]:
    """The JSON body of ``POST /v1/jobs``: the fields the caller gave (the server's defaults
    apply to the others, nested options and constraints included); a manifest goes in full
    (it always says its ``schema_version``)."""
    body = request.model_dump(mode="json", include=set(request.model_fields_set))
    for name in ("options", "constraints"):
        if name in body:
            body[name] = getattr(request, name).model_dump(mode="json", exclude_unset=True)
    return body


def multipart_body(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The multipart form (``request`` JSON and a ``manifest.json`` file) when the body with its
    manifest is larger than :data:`MANIFEST_AS_FILE`; None: send it as JSON."""
    if body.get("manifest") is None or len(json.dumps(body)) <= MANIFEST_AS_FILE:
        return None
    short = json.dumps({k: v for k, v in body.items() if k != "manifest"})
    return {"request": (None, short), "manifest": ("manifest.json", json.dumps(body["manifest"]))}


def has_feature_maps(activations: Activations | str | os.PathLike[str] | None) -> bool:
    """Whether activations (captured, or a saved file) hold feature maps, not only second
    moments (``capture_activations(..., maps=False)``); a file's header says (its ``layers``),
    and a file that cannot be read counts as having maps (the server says what is wrong)."""
    if activations is None:
        return False
    if isinstance(activations, (str, os.PathLike)):
        return activations_file.has_maps(activations)
    return bool(activations.layers)


def data_aware_options(options: Options | None, has_maps: bool) -> Options | None:
    """With feature maps sent, the graph methods compare them (``vectors="activations"``)
    unless the caller's options chose ``vectors`` themselves: maps that cost a capture are
    used, and they find far more redundancy than weights (benchmarks/RESULTS.md, issue 7)."""
    if not has_maps:
        return options
    if options is None:
        return {"vectors": "activations"}
    if isinstance(options, AnalysisOptions):
        if "vectors" in options.model_fields_set:
            return options
        return options.model_copy(update={"vectors": "activations"})
    return options if "vectors" in options else {**options, "vectors": "activations"}
