"""Planning with activation statistics (design §8): what :func:`graphs.planner.plan_layers`
does when it is given ``stats`` (:func:`prepare_stats` before :func:`graphs.planner.make_plan`,
:meth:`StatsPlanning.finish` after).

1. Every prunable group's channel-mixing consumers and their input statistics
   (:func:`graphs.compensated.group_consumers`), and each group's error curve.
2. The graph methods (mrp, srr, hsc) compare the channels' Pearson correlations at the consumer
   inputs (:func:`graphs.compensated.stat_features`), not their weights; a group without
   consumer statistics looks like independent channels (no evidence of redundancy).
3. How many channels each group loses: the method's own rule (``allocation="method"``) or one of
   :mod:`graphs.error_allocation`, default ``functional`` (with a measured sensitivity table:
   ``marginal`` priced by :func:`graphs.error_allocation.sensitivity_weights`); ``functional``
   was picked by a decision rule fixed before the run, on MNIST validation digits
   (benchmarks/fidelity/mnist/allocation.md: functional 83.8 %, marginal 83.7 %, uniform
   83.0 % mean over 12 cells, no cell worse by > 1 point).
   First measurement on MobileNetV2 at −10 % FLOPs without fine-tuning (196
   calibration crops, 292 evaluation inputs from other images, mrp's choice): top-1 agreement
   52 % (KL 0.69) with ``functional``, 54 % (KL 0.75) with ``marginal``, 34 % (KL 1.21) with
   ``uniform`` — ``functional`` and ``marginal`` are within noise, ``uniform`` far behind.
   ``marginal`` priced by a cross-fitted sensitivity table (benchmarks/fidelity/currency/):
   64.0 % at −10 % and 39.7 % at −20 % FLOPs (``functional`` 51.7 / 24.7 %).
4. Which channels: the method's choice, as without statistics, except mrp
   (``least_squares_choice`` of its :mod:`graphs.strategies` entry), which removes the
   channels the rest of the group predicts best at its consumers: the first ones of the
   least-squares greedy path (:func:`graphs.functional.error_curve`), the measured better
   choice (on MobileNetV2 at −10 % FLOPs, compensated: 36 % top-1 agreement against 27 % for
   the same counts chosen by L1).
5. Compensation (unless ``compensation=False``): least-squares folds for every pruned group's
   consumers (:func:`graphs.compensated.compensate`), the same for every method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphs.allocation import group_limit
from graphs.compensated import GroupConsumers, compensate, group_consumers, stat_features
from graphs.cost import CostModel
from graphs.crossfit import crossfit_curves
from graphs.error_allocation import Counts, allocate, sensitivity_weights
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
from graphs.strategies import strategy_for

DEFAULT_ALLOCATION: AllocationRule = "functional"


@dataclass(frozen=True)
class StatsPlanning:
    """What the statistics change in a plan: :func:`graphs.planner.make_plan`'s ``options``,
    ``activations`` and ``counts`` (from :func:`prepare_stats`), then :meth:`finish` on its plan.

    Attributes:
        options: the analysis options (graph methods: ``vectors="activations"``).
        activations: layer name → maps (samples, channels, pixels): the graph methods' Pearson
            features of the consumer inputs added to the caller's maps.
        counts: channels each group loses (None: the method's own rule, ``allocation="method"``).
        found: the groups' consumers and their statistics.
        curves: group id → its error curve.
    """

    options: AnalysisOptions
    activations: Mapping[str, np.ndarray] | None
    counts: Counts | None
    found: GroupConsumers
    curves: dict[int, ErrorCurve]
    rule: AllocationRule
    epsilon: float
    ridge: float
    compensation: bool
    note: str = ""
    """What the rule says of the curves (cross-fitted, weights), for ``method``'s own counts."""

    def finish(self, plan: PruningPlan) -> PruningPlan:
        """The strategy's choice from the statistics where it has one (mrp), the parameters
        and notes, then the folds (unless ``compensation`` is off)."""
        found, curves = self.found, self.curves
        data = plan.model_dump()
        data["parameters"] = {
            **plan.parameters, "allocation": self.rule, "epsilon": self.epsilon,
            "ridge": self.ridge,
        }  # fmt: skip
        missing = sorted(n for names in found.missing.values() for n in names)
        if missing:
            data["rule"] = plan.rule + f"; no statistics for {', '.join(missing)}"
        if self.counts is None:  # the method's own counts: the rule still says how curves were
            data["rule"] += self.note
        by_least_squares = strategy_for(plan.method).least_squares_choice
        for g in data["groups"]:
            specs = found.consumers.get(g["id"])
            k = len(g["remove"])
            if by_least_squares and specs and k:
                # the most replaceable channels: the least-squares greedy path of the group
                curve = curves.get(g["id"])
                if curve is None or curve.order.size < k:
                    curve = error_curve([s.data for s in specs], ridge=self.ridge, max_remove=k)
                g["remove"] = sorted(int(i) for i in curve.order[:k])
                g["rationale"] += "; the channels its consumers' inputs predict best"
            if not self.compensation and g["id"] in curves:
                g["functional_redundancy"] = round(curves[g["id"]].redundancy(self.epsilon), 6)
        out = PruningPlan.model_validate(data)
        if self.compensation:
            return compensate(out, found, ridge=self.ridge, curves=curves, epsilon=self.epsilon)
        return out


def prepare_stats(
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
    sensitivity: Mapping[str, Any] | None = None,
    holdout_stats: Mapping[str, np.ndarray] | None = None,
    workers: int = 1,
) -> StatsPlanning:
    """Steps 1–3 above for ``groups`` (manifest groups, ids set) of ``layers``; ``stats``:
    consumer module name → input second moment (c + 1, c + 1); ``weights``: per-group currency
    of the ``marginal`` allocation; ``sensitivity``: a parsed ``clients.sensitivity`` JSON
    table whose :func:`graphs.error_allocation.sensitivity_weights` are that currency (implies
    ``marginal``); ``holdout_stats``: the statistics of a part of the same data (same keys and
    shapes, e.g. the second half of the source images): the error curves are then
    cross-fitted (:func:`graphs.crossfit.crossfit_curves`: folds fitted on one part, their error
    measured on the other), the folds still fitted on ``stats``; ``workers``: threads computing
    the curves side by side (the result does not depend on it). Run it, the plan and
    :meth:`StatsPlanning.finish` with one BLAS thread (``threadpoolctl.threadpool_limits(1)``):
    the same bits on any machine.

    Raises:
        InvalidInputError: an unknown allocation, a sensitivity table with another allocation
            or with ``weights``, a table that does not fit the model, or epsilon/ridge not
            finite and >= 0, held-out statistics missing a consumer or not a part of ``stats``.
    """
    rule = choose_rule(allocation, sensitivity=sensitivity is not None, weights=weights is not None)
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
    todo = [gid for gid in ids if limit[gid]]
    note = ""
    if holdout_stats is None:
        curves = found.curves(
            todo,
            ridge=ridge,
            max_ratio=constraints.max_ratio,
            stop_above=epsilon if rule in ("uniform", "method") else None,
        )
    else:  # pooled curves in this thread, cross-fitted ones in ``workers`` threads meanwhile
        curves = crossfit_curves(
            found, holdout_stats, ids=todo, ridge=ridge, max_ratio=constraints.max_ratio,
            workers=workers,
        )  # fmt: skip
        note = f"; cross-fitted error curves ({len(holdout_stats)} held-out statistics)"
    opts = options or AnalysisOptions()
    acts = activations
    if strategy_for(method).graph:
        opts = opts.model_copy(update={"vectors": "activations"})
        acts = {**(activations or {})}
        for gid, g in zip(ids, groups, strict=True):
            specs = found.consumers.get(gid)
            if not limit[gid]:
                continue
            maps = stat_features(specs) if specs else _independent(g.n_filters)
            acts.update({m.name: maps for m in g.producers})
    if sensitivity is not None:
        measured = sensitivity_weights(sensitivity, curves, channels=cost.channels)
        weights = measured.weights
        note += (
            f"; weights from a sensitivity table ({len(measured.measured)} groups measured, "
            f"{len(measured.filled)} given their median)"
        )
    counts = None
    if rule != "method":
        counts = allocate(
            rule, cost=cost, target=target, limit=limit, curves=curves,
            round_to=constraints.round_to, weights=weights,
        )  # fmt: skip
        counts = Counts(counts.removed, counts.rule + note)
    return StatsPlanning(
        options=opts, activations=acts, counts=counts, found=found, curves=curves, rule=rule,
        epsilon=epsilon, ridge=ridge, compensation=compensation, note=note,
    )  # fmt: skip


def choose_rule(allocation: str | None, *, sensitivity: bool, weights: bool) -> AllocationRule:
    """The allocation rule: ``allocation`` or the default; ``marginal`` with a sensitivity
    table (``sensitivity``), which gives that rule's weights.

    Raises:
        InvalidInputError: an unknown rule, or a table with another rule or with ``weights``.
    """
    if sensitivity and weights:
        raise InvalidInputError(
            "both a sensitivity table and group weights were given",
            hint="Pass one: the table's weights are computed from it.",
        )
    if sensitivity and allocation not in (None, "marginal"):
        raise InvalidInputError(
            f"a sensitivity table weights the marginal allocation, not {allocation!r}",
            hint="Leave the allocation out (the table implies marginal) or choose marginal.",
        )
    rule = allocation or ("marginal" if sensitivity else DEFAULT_ALLOCATION)
    if rule not in ALLOCATION_RULES:
        raise InvalidInputError(
            f"unknown allocation {rule!r}", hint=f"Use one of {', '.join(ALLOCATION_RULES)}."
        )
    return rule


def _independent(n: int) -> np.ndarray:
    """Pseudo maps (1, n, 2n) of n uncorrelated channels."""
    eye = np.eye(n)
    return np.concatenate([eye, -eye], axis=1)[None]
