"""Planning with activation statistics (design §8): what :func:`graphs.planner.plan_layers`
does when it is given ``stats``.

1. Every prunable group's channel-mixing consumers and their input statistics
   (:func:`graphs.compensated.group_consumers`), and each group's error curve.
2. The graph methods (mrp, srr, hsc) compare the channels' Pearson correlations at the consumer
   inputs (:func:`graphs.compensated.stat_features`), not their weights; a group without
   consumer statistics looks like independent channels (no evidence of redundancy).
3. How many channels each group loses: the method's own rule (``allocation="method"``) or one of
   :mod:`graphs.error_allocation`, default ``functional``: picked by a decision rule fixed before
   the run, on MNIST validation digits (benchmarks/fidelity/mnist/allocation.md: functional
   83.8 %, marginal 83.7 %, uniform 83.0 % mean over 12 cells, no cell worse by > 1 point).
   First measurement on MobileNetV2 at −10 % FLOPs without fine-tuning (196
   calibration crops, 292 evaluation inputs from other images, mrp's choice): top-1 agreement
   52 % (KL 0.69) with ``functional``, 54 % (KL 0.75) with ``marginal``, 34 % (KL 1.21) with
   ``uniform`` — ``functional`` and ``marginal`` are within noise, ``uniform`` far behind.
4. Which channels: the method's choice, as without statistics, except mrp, which removes the
   channels the rest of the group predicts best at its consumers: the first ones of the
   least-squares greedy path (:func:`graphs.functional.error_curve`), the measured better
   choice (on MobileNetV2 at −10 % FLOPs, compensated: 36 % top-1 agreement against 27 % for
   the same counts chosen by L1).
5. Compensation (unless ``compensation=False``): least-squares folds for every pruned group's
   consumers (:func:`graphs.compensated.compensate`), the same for every method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from graphs.allocation import group_limit
from graphs.compensated import GroupConsumers, compensate, group_consumers, stat_features
from graphs.cost import CostModel
from graphs.error_allocation import allocate
from graphs.errors import InvalidInputError
from graphs.functional import ErrorCurve, error_curve
from graphs.layers import LayerGroup, LayerWeights
from graphs.manifest import Manifest
from graphs.options import DEFAULT_EPSILON, DEFAULT_RIDGE, AnalysisOptions
from graphs.plan import (
    ALLOCATION_RULES,
    AllocationRule,
    Constraints,
    PlanMethod,
    PruningPlan,
    Target,
)

DEFAULT_ALLOCATION: AllocationRule = "functional"
GRAPH_METHODS = ("mrp", "srr", "hsc")


@threadpool_limits.wrap(limits=1)  # one BLAS thread: the same bits (folds, ties) on any machine
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
    # uniform and the method's own counts need each curve only up to epsilon (the figure)
    curves = found.curves(
        [gid for gid in ids if limit[gid]],
        ridge=ridge,
        max_ratio=constraints.max_ratio,
        stop_above=epsilon if rule in ("uniform", "method") else None,
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
    return _finish(
        plan, found, curves, rule=rule, epsilon=epsilon, ridge=ridge, compensation=compensation
    )


def _finish(
    plan: PruningPlan,
    found: GroupConsumers,
    curves: dict[int, ErrorCurve],
    *,
    rule: str,
    epsilon: float,
    ridge: float,
    compensation: bool,
) -> PruningPlan:
    """mrp's choice from the statistics, the parameters and notes, then the folds."""
    data = plan.model_dump()
    data["parameters"] = {**plan.parameters, "allocation": rule, "epsilon": epsilon, "ridge": ridge}
    missing = sorted(n for names in found.missing.values() for n in names)
    if missing:
        data["rule"] = plan.rule + f"; no statistics for {', '.join(missing)}"
    for g in data["groups"]:
        specs = found.consumers.get(g["id"])
        k = len(g["remove"])
        if plan.method == "mrp" and specs and k:
            # the most replaceable channels: the least-squares greedy path of the group
            curve = curves.get(g["id"])
            if curve is None or curve.order.size < k:
                curve = error_curve([s.data for s in specs], ridge=ridge, max_remove=k)
            g["remove"] = sorted(int(i) for i in curve.order[:k])
            g["rationale"] += "; the channels its consumers' inputs predict best"
        if not compensation and g["id"] in curves:
            g["functional_redundancy"] = round(curves[g["id"]].redundancy(epsilon), 6)
    out = PruningPlan.model_validate(data)
    if compensation:
        return compensate(out, found, ridge=ridge, curves=curves, epsilon=epsilon)
    return out


def _independent(n: int) -> np.ndarray:
    """Pseudo maps (1, n, 2n) of n uncorrelated channels."""
    eye = np.eye(n)
    return np.concatenate([eye, -eye], axis=1)[None]
