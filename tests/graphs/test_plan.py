"""The plan model (graphs.plan): its validation."""

from __future__ import annotations

import json

import pytest

from graphs.plan import PruningPlan, Target
from tests.graphs.chain import plan_chain


def test_plan_refuses_bad_indices() -> None:
    plan = plan_chain("l1", Target(params=0.3))
    data = json.loads(plan.to_json())
    g = next(g for g in data["groups"] if g["remove"])
    for bad in ([g["remove"][0]] * 2 + g["remove"][2:], [*g["remove"][:-1], g["channels_before"]]):
        data2 = json.loads(plan.to_json())
        grp = next(x for x in data2["groups"] if x["id"] == g["id"])
        grp["remove"] = bad
        with pytest.raises(ValueError, match="indices"):
            PruningPlan.model_validate(data2)
