"""Planning with activation statistics (design §8): what :func:`graphs.planner.plan_layers`
does when it is given ``stats``.

1. Every prunable group's channel-mixing consumers and their input statistics
   (:func:`graphs.compensated.group_consumers`), and each group's error curve.
2. The graph methods (mrp, srr, hsc) compare the channels' Pearson correlations at the consumer
   inputs (:func:`graphs.compensated.stat_features`), not their weights; a group without
   consumer statistics looks like independent channels (no evidence of redundancy).
3. How many channels each group loses: the method's own rule (``allocation="method"``) or one of
   :mod:`graphs.error_allocation` (default ``uniform``, the best measured so far).
4. Which channels: the method's choice, as without statistics.
5. Compensation (unless ``compensation=False``): least-squares folds for every pruned group's
   consumers (:func:`graphs.compensated.compensate`), the same for every method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphs.allocation import group_limit
from graphs.compensated import compensate, group_consumers, stat_features
from graphs.cost import CostModel
from graphs.error_allocation import ALLOCATION_RULES, AllocationRule, allocate
from graphs.errors import InvalidInputError
from graphs.functional import DEFAULT_EPSILON, DEFAULT_RIDGE
from graphs.layers import LayerGroup, LayerWeights
from graphs.manifest import Manifest
from graphs.options import AnalysisOptions
from graphs.plan import Constraints, PlanMethod, PruningPlan, Target

DEFAULT_ALLOCATION: AllocationRule = "uniform"
GRAPH_METHODS = ("mrp", "srr", "hsc")


def plan_with_stats(
    make_plan: Callable[..., PruningPlan],
    layers: Sequence[LayerWeights],
    groups: Sequence[LayerGroup],
    manifest: Manifest,
    stats: Mapping[str, np.ndarray],
    *,
    method: PlanMethod,
    target: Target,
    cost: CostModel,
    constraints: Constraints,
    prunable: dict[int, bool],
    options: AnalysisOptions | None,
    activations: Mapping[str, np.ndarray] | None,
    compensation: bool = True,
    allocation: AllocationRule | None = None,
    epsilon: float = DEFAULT_EPSILON,
    ridge: float = DEFAULT_RIDGE,
    weights: Mapping[int, float] | None = None,
    **kw: Any,
) -> PruningPlan:
    """A plan from ``make_plan`` (the planner's) with the statistics used as described above.

    ``kw`` goes to ``make_plan`` unchanged (step, seed, checkpoint_sha256, param_shapes, cache).
    ``weights``: per-group currency of the ``marginal`` allocation.
    """
    rule = allocation or DEFAULT_ALLOCATION
    if rule not in ALLOCATION_RULES:
        raise InvalidInputError(
            f"unknown allocation {rule!r}", hint=f"Use one of {', '.join(ALLOCATION_RULES)}."
        )
    for name, v in (("epsilon", epsilon), ("ridge", ridge)):
        if not (np.isfinite(v) and v >= 0):
            raise InvalidInputError(f"{name} must be a finite number >= 0, got {v}")
    found = group_consumers(layers, manifest, stats)
    ids = [g.group_id for g in groups if g.group_id is not None]
    limit = {
        gid: group_limit(g.n_filters, constraints)
        if prunable.get(gid, True) and not any(m.name in constraints.ignored for m in g.producers)
        else 0
        for gid, g in zip(ids, groups, strict=True)
    }
    curves = found.curves(
        [gid for gid in ids if limit[gid]], ridge=ridge, max_ratio=constraints.max_ratio
    )
    opts = options or AnalysisOptions()
    acts = activations
    if method in GRAPH_METHODS:
        opts = opts.model_copy(update={"vectors": "activations"})
        acts = {**(activations or {})}
        for gid, g in zip(ids, groups, strict=True):
            specs = found.consumers.get(gid)
            if not limit[gid]:
                continue
            maps = stat_features(specs) if specs else _independent(g.n_filters)
            acts.update({m.name: maps for m in g.producers})
    counts = None
    if rule != "method":
        counts = allocate(
            rule, cost=cost, target=target, limit=limit, curves=curves,
            round_to=constraints.round_to, weights=weights,
        )  # fmt: skip
    plan = make_plan(
        groups, method=method, target=target, cost=cost, constraints=constraints, options=opts,
        prunable=prunable, activations=acts, counts=counts, **kw,
    )  # fmt: skip
    params = {**plan.parameters, "allocation": rule, "epsilon": epsilon, "ridge": ridge}
    plan = PruningPlan.model_validate({**plan.model_dump(), "parameters": params})
    missing = sorted(n for names in found.missing.values() for n in names)
    if missing:
        plan = PruningPlan.model_validate(
            {**plan.model_dump(), "rule": plan.rule + f"; no statistics for {', '.join(missing)}"}
        )
    if compensation:
        return compensate(plan, found, ridge=ridge, curves=curves, epsilon=epsilon)
    groups_out = [
        g.model_copy(update={"functional_redundancy": round(curves[g.id].redundancy(epsilon), 6)})
        if g.id in curves
        else g
        for g in plan.groups
    ]
    return PruningPlan.model_validate(
        {**plan.model_dump(), "groups": [g.model_dump() for g in groups_out]}
    )


def _independent(n: int) -> np.ndarray:
    """Pseudo maps (1, n, 2n) of n uncorrelated channels."""
    eye = np.eye(n)
    return np.concatenate([eye, -eye], axis=1)[None]
