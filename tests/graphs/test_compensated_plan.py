"""Compensated plans (graphs.compensated_plan): the allocation rules, the choice with
statistics, the compensation switch and clear errors."""

from __future__ import annotations

import pytest

from graphs import InvalidInputError
from graphs.compensated import plan_sidecar
from graphs.functional import error_curve
from graphs.plan import Target
from graphs.planner import plan_layers
from tests.graphs.chain import tiny_manifest
from tests.graphs.stats_case import plan_tiny, planted_stats


def test_no_compensation_keeps_the_choice_and_drops_the_folds() -> None:
    with_folds = plan_tiny("l1", stats=planted_stats())
    without = plan_tiny("l1", stats=planted_stats(), compensation=False)
    assert without.compensation is None and "compensation" not in without.to_json()
    assert [g.remove for g in without.groups] == [g.remove for g in with_folds.groups]
    assert plan_sidecar(without) == b""


@pytest.mark.parametrize("allocation", ["uniform", "functional", "marginal", "method"])
def test_allocations_meet_the_target(allocation: str) -> None:
    plan = plan_tiny("l1", stats=planted_stats(), allocation=allocation)
    assert plan.achieved["flops"] >= 0.25
    assert plan.parameters["allocation"] == allocation
    fr = {g.id: g.functional_redundancy for g in plan.groups}
    assert fr[0] == pytest.approx(3 / 8) and fr[1] is not None and fr[1] <= 0.2


def test_functional_allocation_takes_the_redundant_group_first() -> None:
    plan = plan_tiny("random", stats=planted_stats(), allocation="functional", seed=3)
    removed = {g.id: len(g.remove) for g in plan.groups}
    uniform_plan = plan_tiny("random", stats=planted_stats(), allocation="uniform", seed=3)
    uniform = {g.id: len(g.remove) for g in uniform_plan.groups}
    assert removed[0] >= 3 and removed[0] > uniform[0]


def test_bad_statistics_are_clear_errors() -> None:
    stats = planted_stats()
    with pytest.raises(InvalidInputError, match="must be"):
        plan_tiny("l1", stats={**stats, "b": stats["b"][:5, :5]})
    with pytest.raises(InvalidInputError, match="no conv/linear layer"):
        plan_tiny("l1", stats={**stats, "nope": stats["b"]})
    with pytest.raises(InvalidInputError, match="allocation"):
        plan_tiny("l1", stats=stats, allocation="greedy")
    with pytest.raises(InvalidInputError, match="epsilon"):
        plan_tiny("l1", stats=stats, epsilon=-1.0)
    _man, layers = tiny_manifest()
    with pytest.raises(InvalidInputError, match="manifest"):
        plan_layers(layers, method="l1", target=Target(params=0.2), params_total=1, stats=stats)


def test_missing_consumer_statistics_are_named_in_the_rule() -> None:
    plan = plan_tiny("l1", stats={"b": planted_stats()["b"]})
    assert "no statistics for fc" in plan.rule
    assert {f.consumer for f in plan.compensation.folds} <= {"b"}  # type: ignore[union-attr]


def test_mrp_with_statistics_removes_the_head_of_the_least_squares_path() -> None:
    from graphs.compensated import group_consumers

    man, layers = tiny_manifest()
    plan = plan_tiny("mrp", stats=planted_stats())
    found = group_consumers(layers, man, planted_stats())
    for g in plan.groups:
        if g.remove and g.id in found.consumers:
            curve = error_curve([s.data for s in found.consumers[g.id]], max_remove=len(g.remove))
            assert g.remove == sorted(int(i) for i in curve.order)
