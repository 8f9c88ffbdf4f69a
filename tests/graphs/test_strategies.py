"""The planning strategies (graphs.strategies): the table covers every plan method, each
strategy chooses valid channels, and make_plan dispatches through the table."""

from __future__ import annotations

import numpy as np
import pytest

from graphs import InvalidInputError
from graphs.allocation import Budget, group_limit
from graphs.cost import CostModel
from graphs.grouping import build_groups
from graphs.options import AnalysisOptions
from graphs.plan import PLAN_METHODS, Constraints, Target
from graphs.planner import make_plan
from graphs.strategies import (
    GRAPH_METHODS,
    STRATEGIES,
    PlanInputs,
    UniformStrategy,
    strategy_for,
)
from tests.graphs.chain import chain


def _inputs(method: str) -> PlanInputs:
    layers = chain()
    groups, _ = build_groups(layers, None)
    cost = CostModel.from_layers(groups, sum(layer.params for layer in layers))
    rng = np.random.default_rng(0)
    maps = {g.name: rng.standard_normal((3, g.n_filters, 5)) for g in groups}
    return PlanInputs(
        groups=dict(enumerate(groups)),
        limit={i: group_limit(g.n_filters, Constraints()) for i, g in enumerate(groups)},
        budget=Budget(cost, Target(params=0.3), list(range(len(groups)))),
        options=AnalysisOptions(),
        seed=0,
        step=0.05,
        cache=None,
        activations=maps if method == "ci" else None,
        counts=None,
    )


def test_the_table_covers_every_plan_method_in_order() -> None:
    assert tuple(STRATEGIES) == PLAN_METHODS
    assert all(s.method == m for m, s in STRATEGIES.items())
    assert GRAPH_METHODS == ("mrp", "srr", "hsc")
    assert [m for m, s in STRATEGIES.items() if s.least_squares_choice] == ["mrp"]
    for method in PLAN_METHODS:
        assert strategy_for(method) is STRATEGIES[method]


def test_unknown_methods_are_refused_with_the_known_ones() -> None:
    with pytest.raises(InvalidInputError, match="unknown plan method 'magic'") as info:
        strategy_for("magic")
    assert all(m in info.value.hint for m in PLAN_METHODS)
    inputs = _inputs("l1")
    with pytest.raises(InvalidInputError, match="unknown plan method"):
        make_plan(
            list(inputs.groups.values()),
            method="magic",  # type: ignore[arg-type]
            target=Target(params=0.3),
            cost=inputs.budget.cost,
        )


@pytest.mark.parametrize("method", PLAN_METHODS)
def test_every_strategy_chooses_valid_channels(method: str) -> None:
    strategy = STRATEGIES[method]  # type: ignore[index]
    inputs = _inputs(method)
    alloc = strategy.allocate(inputs)
    assert set(alloc.removed) == set(inputs.groups)
    for gid, g in inputs.groups.items():
        for n in sorted({0, 1, g.n_filters // 2, inputs.limit[gid]}):
            idx = strategy.select(inputs, alloc, gid, n)
            assert idx == sorted(set(idx)) and len(idx) == n, (gid, n)
            assert all(0 <= i < g.n_filters for i in idx)
        assert strategy.removed_at(alloc, gid, 0.0, base=0, limit=inputs.limit[gid]) == 0
        assert 0 <= strategy.removed_at(alloc, gid, 1.0, base=0, limit=inputs.limit[gid])
        assert strategy.removed_at(alloc, gid, 1.0, base=0, limit=inputs.limit[gid]) <= max(
            inputs.limit[gid], 0
        )
    params = strategy.parameters(inputs.options, 2)
    assert params["step"] == 2 and ("fallback" in params) == strategy.graph


def test_a_strategy_in_the_table_is_what_make_plan_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a method is adding a strategy: make_plan finds it in the table (here l1 swapped
    for a strategy that removes the highest indices first)."""
    inputs = _inputs("l1")
    last_first = UniformStrategy("l1", lambda g, seed: np.arange(g.n_filters)[::-1])
    monkeypatch.setitem(STRATEGIES, "l1", last_first)
    plan = make_plan(
        list(inputs.groups.values()), method="l1", target=Target(params=0.3),
        cost=inputs.budget.cost, prunable={0: False, 4: False},
    )  # fmt: skip
    assert plan.achieved["params"] >= 0.3
    for g in plan.groups:
        k = len(g.remove)
        assert g.remove == list(range(g.channels_before - k, g.channels_before)), g.name
