"""Compensated plans (graphs.compensated_plan): the allocation rules, the choice with
statistics, the compensation switch and clear errors."""

from __future__ import annotations

from typing import Any

import pytest

from graphs import InvalidInputError
from graphs.compensated import group_consumers, plan_sidecar
from graphs.error_allocation import sensitivity_weights
from graphs.functional import error_curve
from graphs.plan import PruningPlan, Target
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
    man, layers = tiny_manifest()
    plan = plan_tiny("mrp", stats=planted_stats())
    found = group_consumers(layers, man, planted_stats())
    for g in plan.groups:
        if g.remove and g.id in found.consumers:
            curve = error_curve([s.data for s in found.consumers[g.id]], max_remove=len(g.remove))
            assert g.remove == sorted(int(i) for i in curve.order)


def sensitivity_table(heavy: int, *, compensated: bool = True) -> dict[str, Any]:
    """A ``clients.sensitivity(..., order="functional")`` JSON table of the tiny model whose
    deltas make group ``heavy`` 10⁴ times as sensitive as the other."""
    rows = [
        {"group": gid, "name": name, "producers": [name], "channels": n, "fraction": k / n,
         "removed": k, "compensated": compensated, "metric": 0.0,
         "delta": (100.0 if gid == heavy else 0.01) * k}
        for gid, name, n, ks in ((0, "a", 8, (2, 4, 6)), (1, "b", 6, (1, 3, 5)))
        for k in ks
    ]  # fmt: skip
    return {"baseline": 0.0, "order": "functional", "seed": 0, "skipped": {}, "rows": rows}


def plan_40(**kw: object) -> PruningPlan:
    """The tiny model's plan at -40 % FLOPs by l1 with planted statistics."""
    man, layers = tiny_manifest()
    return plan_layers(
        layers, method="l1", target=Target(flops=0.4), params_total=man.params_total,
        manifest=man, stats=planted_stats(), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_a_sensitivity_table_prices_the_marginal_allocation() -> None:
    man, layers = tiny_manifest()
    table = sensitivity_table(0)
    curves = group_consumers(layers, man, planted_stats()).curves([0, 1], max_ratio=0.9)
    weights = sensitivity_weights(table, curves, channels={g.id: g.channels for g in man.groups})
    by_table = plan_40(sensitivity=table)
    by_hand = plan_40(allocation="marginal", group_weights=weights.weights)
    assert by_table.parameters["allocation"] == "marginal"  # implied
    assert [g.remove for g in by_table.groups] == [g.remove for g in by_hand.groups]
    assert "weights from a sensitivity table (2 groups measured" in by_table.rule
    assert "sensitivity" not in by_hand.rule
    assert by_table.to_json() == plan_40(sensitivity=sensitivity_table(0)).to_json()
    # the sensitive group loses fewer channels than when the other one is the sensitive one
    removed = {g.id: len(g.remove) for g in by_table.groups}
    other = {g.id: len(g.remove) for g in plan_40(sensitivity=sensitivity_table(1)).groups}
    assert removed[0] < other[0] and removed[1] > other[1]
    assert by_table.achieved["flops"] >= 0.4


def test_bad_sensitivity_tables_are_clear_errors() -> None:
    table = sensitivity_table(0)
    with pytest.raises(InvalidInputError, match="marginal allocation, not 'functional'"):
        plan_40(sensitivity=table, allocation="functional")
    with pytest.raises(InvalidInputError, match="both a sensitivity table and group weights"):
        plan_40(sensitivity=table, group_weights={0: 1.0})
    with pytest.raises(InvalidInputError, match="no compensated rows"):
        plan_40(sensitivity=sensitivity_table(0, compensated=False))
    wrong = {**table, "rows": [{**r, "group": 7} for r in table["rows"]]}
    with pytest.raises(InvalidInputError, match="group 7"):
        plan_40(sensitivity=wrong)
    with pytest.raises(InvalidInputError, match="'rows' list"):
        plan_40(sensitivity=[])
    man, layers = tiny_manifest()
    with pytest.raises(InvalidInputError, match="needs activation statistics"):
        plan_layers(
            layers, method="l1", target=Target(flops=0.4), params_total=man.params_total,
            manifest=man, sensitivity=table,
        )  # fmt: skip
