"""The job contracts (graphs.contracts.jobs): request and status round trips, and the request's
validation (the same errors on the client and on the service, which share the model)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from graphs import InvalidInputError
from graphs.contracts.jobs import (
    MAX_INPUT_RANK,
    MAX_INPUTS,
    JobRequest,
    JobStatus,
    check_input_shapes,
)
from graphs.manifest import Manifest
from graphs.options import DEFAULT_EPSILON
from graphs.report import ALL_METHODS, METHODS


def _status(**change: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "j1",
        "status": "running",
        "progress": 0.5,
        "error": None,
        "checkpoint_id": "c" * 64,
        "request": {"checkpoint_id": "c" * 64, "methods": ["l1"]},
        "has_manifest": False,
        "has_plan": False,
        "cache_hits": 1,
        "cache_misses": 2,
        "created_at": 1.0,
        "updated_at": 2.0,
    }
    return {**base, **change}


def test_defaults_and_their_serialization() -> None:
    request = JobRequest(checkpoint_id="abc")
    assert request.methods == list(ALL_METHODS) and request.plan_method == "mrp"
    data = json.loads(request.model_dump_json())
    # the planning options and input_shape are left out at their defaults (older requests)
    assert not {"compensation", "allocation", "epsilon", "crossfit", "input_shape"} & set(data)
    assert request.crossfit is True
    assert data["checkpoint_id"] == "abc" and data["step"] == 0.05 and data["target"] is None


def test_request_round_trip_keeps_every_field() -> None:
    request = JobRequest.model_validate(
        {
            "checkpoint_id": "abc",
            "methods": ["ci", "l1", "mrp", "l1"],
            "seed": 7,
            "target": {"flops": 0.3},
            "plan_method": "l1",
            "step": 2,
            "activations_id": "act",
            "input_shape": [1, 3, 8, 8],
            "compensation": False,
            "allocation": "uniform",
            "epsilon": 0.02,
            "crossfit": False,
            "options": {"vectors": "activations"},
            "constraints": {"min_channels": 2},
        }
    )
    assert request.methods == [m for m in METHODS if m in {"ci", "l1", "mrp"}]  # canonical
    assert request.input_shape == [[1, 3, 8, 8]]  # one input's shape
    text = request.model_dump_json()
    again = JobRequest.model_validate_json(text)
    assert again == request and again.model_dump_json() == text
    data = json.loads(text)
    assert data["compensation"] is False and data["allocation"] == "uniform"
    assert data["epsilon"] == 0.02 != DEFAULT_EPSILON
    assert data["crossfit"] is False
    assert "crossfit" not in json.loads(
        request.model_copy(update={"crossfit": True}).model_dump_json()
    )


def test_a_manifest_travels_in_the_request() -> None:
    manifest = Manifest(
        input_shapes=[[1, 3]],
        params_total=0,
        macs_total=0,
        param_shapes={},
        layers=[],
        groups=[],
        costs=[],
    )
    request = JobRequest(checkpoint_id="abc", manifest=manifest)
    assert JobRequest.model_validate_json(request.model_dump_json()).manifest == manifest
    with pytest.raises(ValidationError, match="either manifest or input_shape"):
        JobRequest(checkpoint_id="abc", manifest=manifest, input_shape=[[1, 3]])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"methods": ["nope"]}, "unknown or missing methods: nope"),
        ({"methods": []}, "unknown or missing methods"),
        ({"step": 1.5}, "step must be an integer >= 1 or a fraction"),
        ({"step": 0}, "greater than 0"),
        ({"seed": -1}, "greater than or equal to 0"),
        ({"seed": 2**32}, "less than or equal to"),
        ({"methods": ["ci"]}, "ci need feature maps.*pass activations_id"),
        ({"options": {"vectors": "activations"}}, "vectors=activations need feature maps"),
        ({"input_shape": [[0, 3]]}, "has a dim below 1"),
        ({"input_shape": [[1]] * (MAX_INPUTS + 1)}, f"give 1 to {MAX_INPUTS} shapes"),
        ({"epsilon": float("inf")}, "finite number"),
        ({"epsilon": -0.1}, "greater than or equal to 0"),
        ({"allocation": "greedy"}, "allocation"),
        ({"crossfit": "sometimes"}, "crossfit"),
        ({"plan_method": "magic"}, "plan_method"),
        ({"target": {"flops": 0.5, "params": 0.5}}, "target"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        JobRequest.model_validate({"checkpoint_id": "abc", **change})


def test_a_plan_with_ci_needs_activations_only_when_it_plans() -> None:
    JobRequest(checkpoint_id="abc", methods=["l1"], plan_method="ci")  # no target: no plan
    with pytest.raises(ValidationError, match="ci need feature maps"):
        JobRequest.model_validate(
            {
                "checkpoint_id": "abc",
                "methods": ["l1"],
                "plan_method": "ci",
                "target": {"params": 0.2},
            }
        )
    JobRequest.model_validate(
        {
            "checkpoint_id": "abc",
            "plan_method": "ci",
            "target": {"params": 0.2},
            "activations_id": "act",
        }
    )


def test_input_shapes_are_bounded() -> None:
    assert check_input_shapes([(1, 3, 4, 4), [2]]) == [[1, 3, 4, 4], [2]]
    bads: list[list[list[int]]] = [
        [],
        [[1] * (MAX_INPUT_RANK + 1)],
        [[]],
        [[2**31]],
        [[2**20, 2**20, 2]],
    ]
    for bad in bads:
        with pytest.raises(InvalidInputError) as info:
            check_input_shapes(bad)
        assert info.value.hint.startswith("Give one shape per model input")


def test_status_round_trip_and_finished() -> None:
    status = JobStatus.model_validate(_status())
    assert JobStatus.model_validate_json(status.model_dump_json()) == status
    assert list(json.loads(status.model_dump_json())) == list(_status())  # field order
    assert not status.finished
    assert JobStatus.model_validate(_status(status="done", progress=1.0)).finished
    assert JobStatus.model_validate(_status(status="failed", error="boom")).finished


def test_status_ignores_unknown_fields_and_needs_the_known_ones() -> None:
    status = JobStatus.model_validate(_status(added_later=1))
    assert "added_later" not in status.model_dump()
    with pytest.raises(ValidationError, match="frozen"):
        status.progress = 1.0  # type: ignore[misc]
    missing = _status()
    del missing["has_plan"]
    with pytest.raises(ValidationError, match="has_plan"):
        JobStatus.model_validate(missing)
