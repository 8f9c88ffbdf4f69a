"""Pruning plans: how many channels each group loses, and which, to reach a target (design §4).

Each method is a strategy (:data:`graphs.strategies.STRATEGIES`); :func:`make_plan` runs the
same loop for all: the strategy's own allocation, the uniform remainder, the strategy's choice of
channels, its rationale and rule. :func:`plan_layers` plans a checkpoint's layers (with
activation statistics through :mod:`graphs.compensated_plan`). Allocation per method:

* ``mrp`` (SRP): repeat — in the most redundant group (mrp redundancy of its kept filters),
  remove its most replaceable filters (``step`` at a time: an int is a count, step=1 exact; a
  float in (0, 1) a fraction of the group) and recompute that group only — until the target;
* ``srr``: repeat — remove one vertex from the graph of the most redundant group (srr
  redundancy) and recompute it; the counts found this way are then taken as the filters of
  smallest L1 in each group, as in the paper;
* ``hsc``: the same greedy allocation on hsc redundancy; the kept filters are one medoid per
  cluster (clustering into exactly as many clusters as are kept when that is fewer);
* ``l1`` / ``fpgm`` / ``random``: one uniform ratio for all groups, found by bisection.

(The greedy rule itself is :func:`graphs.allocation.redundancy_allocation`.) When no group has
redundancy left and the target is not met, the remaining reduction is taken **uniformly**: one
extra ratio for all groups (bisection), filters chosen by the method's own order (mrp:
replaceability then L1; srr and hsc: L1 / cluster order). With ``options.fallback="anneal"``
the greedy rule first goes on at softer, still calibrated graph levels (:mod:`graphs.anneal`),
which set how many filters each group loses; the uniform ratio is then the last resort. The
plan's ``rule`` says how many channels each stage removed. Constraints (ignored groups, minimum
channels, maximum ratio per group, ``round_to``) hold throughout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from graphs.allocation import Allocation, Budget, group_limit
from graphs.cache import Cache
from graphs.compensated import curve_workers
from graphs.compensated_plan import prepare_stats
from graphs.cost import CostModel, infer_consumers
from graphs.error_allocation import Counts
from graphs.errors import InvalidInputError, NoPrunableLayersError
from graphs.features import Activations
from graphs.grouping import build_groups
from graphs.layers import LayerGroup, LayerWeights
from graphs.manifest import Manifest
from graphs.options import DEFAULT_EPSILON, DEFAULT_RIDGE, AnalysisOptions, check_features
from graphs.plan import AllocationRule, Constraints, GroupPlan, PlanMethod, PruningPlan, Target
from graphs.recurrent import hidden_kept
from graphs.strategies import PlanInputs, Strategy, strategy_for
from graphs.transformer import adapt_manifest, plan_fields


def make_plan(
    groups: Sequence[LayerGroup],
    *,
    method: PlanMethod,
    target: Target,
    cost: CostModel,
    constraints: Constraints | None = None,
    options: AnalysisOptions | None = None,
    step: float = 0.05,
    seed: int = 0,
    checkpoint_sha256: str | None = None,
    prunable: dict[int, bool] | None = None,
    param_shapes: dict[str, list[int]] | None = None,
    cache: Cache | None = None,
    activations: Activations | None = None,
    counts: Counts | None = None,
) -> PruningPlan:
    """A plan that removes ``target`` of the FLOPs or params by ``method``
    (its :data:`graphs.strategies.STRATEGIES` entry).

    Args:
        groups: the analysed groups; ``group_id`` (manifest) or the position is the cost id.
        cost: params/MACs model over the same ids (:class:`graphs.cost.CostModel`).
        prunable: group id → whether it may lose channels (stem/classifier are not).
        step: filters removed per greedy iteration (int ≥ 1) or fraction of the group.
        param_shapes: all parameter shapes (manifest) for ``expected_shapes``.
        cache: per-group graphs and clusterings already computed (by an analysis or an earlier
            plan of the same weights, parameters and seed) are reused; see :mod:`graphs.cache`.
        activations: feature maps per layer (samples, channels, pixels): needed by ``ci`` and
            by graph methods with ``options.vectors == "activations"``.
        counts: channels to remove per group, decided elsewhere (:mod:`graphs.error_allocation`);
            the method then only chooses which (graph methods: their redundant filters first).
    """
    c = constraints or Constraints()
    opts = options or AnalysisOptions()
    strategy = strategy_for(method)
    check_features([method], opts, activations)
    if not (step >= 1 and float(step).is_integer()) and not 0 < step < 1:
        raise InvalidInputError(f"step must be an integer >= 1 or a fraction in (0, 1), got {step}")
    ids = [g.group_id if g.group_id is not None else i for i, g in enumerate(groups)]
    by_id = dict(zip(ids, groups, strict=True))
    ok = {
        gid: (prunable or {}).get(gid, True)
        and not any(m.name in c.ignored for m in g.producers)
        and not (activations is not None and g.unit == "hidden")  # no maps: kept whole
        for gid, g in by_id.items()
    }
    inputs = PlanInputs(
        groups=by_id,
        limit={gid: group_limit(g.n_filters, c) if ok[gid] else 0 for gid, g in by_id.items()},
        budget=Budget(cost, target, ids),
        options=opts, seed=seed, step=step, cache=cache, activations=activations, counts=counts,
    )  # fmt: skip
    alloc = strategy.allocate(inputs)
    base = {gid: len(alloc.removed[gid]) for gid in ids}
    _uniform_remainder(inputs, strategy, alloc, base, c.round_to or 1)
    plans, fallback = _group_plans(inputs, strategy, alloc, base, ok)
    greedy = sum(min(base[p.id], len(p.remove)) for p in plans)
    rule = strategy.rule(alloc, greedy=greedy, fallback=fallback)
    if counts is not None:
        rule = f"{method} chose the channels; counts by {counts.rule}"
    budget = inputs.budget
    if budget.achieved() < target.ratio - 1e-9:
        rule += f"; target not reachable under the constraints (reached {budget.achieved():.3f})"
    shapes = {**(param_shapes or {}), **cost.shapes(budget.kept)}
    params_after = cost.params(budget.kept)
    macs_after = cost.macs(budget.kept)
    achieved = {"params": round(1 - params_after / max(budget.params0, 1), 6)}
    if macs_after is not None and budget.macs0:
        achieved["flops"] = round(1 - macs_after / budget.macs0, 6)
    return PruningPlan(
        checkpoint_sha256=checkpoint_sha256,
        method=method,
        target=target,
        constraints=c,
        seed=seed,
        parameters=strategy.parameters(opts, int(step) if step >= 1 else step),
        coupling="manifest" if any(g.coupling == "manifest" for g in groups) else "unknown",
        groups=plans,
        expected_shapes={k: shapes[k] for k in sorted(shapes)},
        params_before=budget.params0,
        params_after=params_after,
        flops_before=budget.macs0,
        flops_after=macs_after,
        achieved=achieved,
        rule=rule,
    )


def _group_plans(
    inputs: PlanInputs,
    strategy: Strategy,
    alloc: Allocation,
    base: dict[int, int],
    ok: dict[int, bool],
) -> tuple[list[GroupPlan], int]:
    """Every group's plan (its channels chosen by ``strategy``, as many as the budget keeps
    out), and how many channels the uniform remainder took in all."""
    budget, maps = inputs.budget, inputs.activations is not None
    plans: list[GroupPlan] = []
    fallback = 0
    for gid, g in inputs.groups.items():
        extra = max(budget.cost.channels[gid] - budget.kept[gid] - base[gid], 0)
        fallback += extra
        idx = strategy.select(inputs, alloc, gid, g.n_filters - budget.kept[gid])
        budget.set(gid, g.n_filters - len(idx))
        if ok[gid]:
            why = strategy.rationale(alloc, gid, greedy=min(base[gid], len(idx)), extra=extra)
        else:
            why = "not pruned (ignored: stem, classifier or the user's choice)"
        plans.append(
            GroupPlan(
                id=gid,
                name=g.name,
                producers=[m.name for m in g.producers],
                channels_before=g.n_filters,
                channels_after=g.n_filters - len(idx),
                remove=idx,
                redundancy=alloc.redundancy[gid],
                rationale=hidden_kept(g, ok[gid], maps) or why,
                **plan_fields(g),
            )
        )
    return plans, fallback


def _uniform_remainder(
    inputs: PlanInputs, strategy: Strategy, alloc: Allocation, base: dict[int, int], step_of: int
) -> None:
    """Set the kept channels of every group in ``inputs.budget``: the uniform remainder (the
    baselines' whole rule; the graph methods' fallback; ci's threshold): one level ``rho`` of
    what each group may still lose on top of what the method's rule took (``base``), found by
    bisection; ``step_of`` (round_to) is part of it, so rounding never leaves the target unmet
    when it can be met. With counts, the counts. A level moves in whole channels (or round_to
    blocks) per group: channels are then given back while the target still holds, most-cut
    groups first."""
    budget, cost, counts, limit = inputs.budget, inputs.budget.cost, inputs.counts, inputs.limit
    ids = list(inputs.groups)

    def kept_at(rho: float) -> dict[int, int]:
        out = dict(budget.kept)
        for gid in ids:
            if counts is not None:
                r = min(limit[gid], counts.removed.get(gid, 0))
            else:
                r = strategy.removed_at(alloc, gid, rho, base=base[gid], limit=limit[gid])
            out[gid] = cost.channels[gid] - _rounded(cost.channels[gid], r, step_of)
        return out

    final = kept_at(0.0)
    if budget.achieved(final) < budget.target.ratio and counts is None:
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if budget.achieved(kept_at(mid)) >= budget.target.ratio:
                hi = mid
            else:
                lo = mid
        final = kept_at(hi)
    for gid in ids:
        budget.set(gid, final[gid])
    for gid in sorted(ids, key=lambda i: (budget.kept[i] - cost.channels[i], i)):
        top = cost.channels[gid] - _rounded(cost.channels[gid], base[gid], step_of)
        while counts is None and budget.kept[gid] + step_of <= top:
            budget.set(gid, budget.kept[gid] + step_of)
            if not budget.met():
                budget.set(gid, budget.kept[gid] - step_of)
                break


def _rounded(n: int, r: int, step_of: int) -> int:
    """Channels removed from a group of ``n`` when ``r`` are asked for and the kept count must
    be a multiple of ``step_of`` (or all ``n``)."""
    if r <= 0 or step_of == 1:
        return max(r, 0)
    return n - min(n, math.ceil((n - r) / step_of) * step_of)


def plan_layers(
    layers: Sequence[LayerWeights],
    *,
    method: PlanMethod,
    target: Target,
    params_total: int,
    manifest: Manifest | None = None,
    constraints: Constraints | None = None,
    options: AnalysisOptions | None = None,
    step: float = 0.05,
    seed: int = 0,
    checkpoint_sha256: str | None = None,
    cache: Cache | None = None,
    activations: Activations | None = None,
    stats: Mapping[str, np.ndarray] | None = None,
    compensation: bool = True,
    allocation: AllocationRule | None = None,
    epsilon: float = DEFAULT_EPSILON,
    ridge: float = DEFAULT_RIDGE,
    group_weights: Mapping[int, float] | None = None,
    sensitivity: Mapping[str, Any] | None = None,
    holdout_stats: Mapping[str, np.ndarray] | None = None,
) -> PruningPlan:
    """Plan for a checkpoint's layers: groups from the manifest (exact params and MACs, its
    stem/classifier/ignored groups kept whole) or, without one, from the layers alone (params
    estimated, coupling ``unknown``, FLOPs targets refused; the first layer in checkpoint order
    and every layer no other layer reads are kept whole as stem and outputs).

    With ``stats`` (consumer module name → input second moment; needs a manifest) see
    :mod:`graphs.compensated_plan` (``group_weights``: the ``marginal`` allocation's currency;
    ``sensitivity``: a parsed ``clients.sensitivity`` JSON table that gives it, which needs
    ``stats``; ``holdout_stats``: the statistics of a part of the same data, for cross-fitted
    error curves, which needs ``stats``)."""
    if holdout_stats is not None and stats is None:
        raise InvalidInputError(
            "held-out statistics cross-fit the error curves of compensated plans: they need "
            "the statistics of all the calibration data",
            hint="Pass stats (all the data) and holdout_stats (a part of it).",
        )
    if sensitivity is not None and stats is None:
        raise InvalidInputError(
            "a sensitivity table weights the allocation of compensated plans: it needs "
            "activation statistics",
            hint="Pass second moments of the consumers' inputs (--activations from "
            "clients.capture_activations(model, batches, maps=False)) and the manifest.",
        )
    if manifest is not None:
        manifest = adapt_manifest(layers, manifest)  # transformer blocks: one group of vertices
    groups, _ = build_groups(layers, manifest)
    if not groups:
        raise NoPrunableLayersError("no layer of the checkpoint can be planned")
    c = _expand_ignored(layers, constraints or Constraints())
    shapes: dict[str, list[int]] | None = None
    if manifest is not None:
        cost, prunable, c = _manifest_costs(groups, manifest, c)
        shapes = {k: list(v) for k, v in manifest.param_shapes.items()}
    elif stats is not None:
        raise InvalidInputError(
            "compensation from activation statistics needs the model's manifest",
            hint="Pass --manifest (prunegraph manifest --model pkg.module:factory "
            "--input-shape 1,3,224,224 -o manifest.json), or plan without statistics.",
        )
    else:
        cost, prunable = CostModel.from_layers(groups, params_total), _edges_kept(groups)
    if manifest is None or stats is None:
        return make_plan(
            groups, method=method, target=target, cost=cost, constraints=c, options=options,
            step=step, seed=seed, checkpoint_sha256=checkpoint_sha256, prunable=prunable,
            param_shapes=shapes, cache=cache, activations=activations,
        )  # fmt: skip
    workers = curve_workers()  # the BLAS threads allowed, as threads of whole curves
    with threadpool_limits(limits=1):  # one BLAS thread: the same bits on any machine
        stat = prepare_stats(
            layers, groups, manifest, stats, method=method, target=target, cost=cost,
            constraints=c, prunable=prunable, options=options, activations=activations,
            compensation=compensation, allocation=allocation, epsilon=epsilon, ridge=ridge,
            weights=group_weights, sensitivity=sensitivity, holdout_stats=holdout_stats,
            workers=workers,
        )  # fmt: skip
        plan = make_plan(
            groups, method=method, target=target, cost=cost, constraints=c, options=stat.options,
            step=step, seed=seed, checkpoint_sha256=checkpoint_sha256, prunable=prunable,
            param_shapes=shapes, cache=cache, activations=stat.activations, counts=stat.counts,
        )  # fmt: skip
        return stat.finish(plan)


def _expand_ignored(layers: Sequence[LayerWeights], c: Constraints) -> Constraints:
    """``c`` with its ignored names (layers or containers) expanded to layer names.

    Raises:
        InvalidInputError: a name that matches no layer.
    """
    if not c.ignored:
        return c
    names = [layer.name for layer in layers]
    expanded: set[str] = set()
    for want in c.ignored:
        hit = [n for n in names if n == want or n.startswith(want + ".")]
        if not hit:
            raise InvalidInputError(
                f"ignored layer {want!r} matches no layer of the checkpoint",
                hint="Use layer names as in the report (e.g. features.0.0) or a container "
                "prefix (e.g. features.0).",
            )
        expanded.update(hit)
    return c.model_copy(update={"ignored": sorted(expanded)})


def _manifest_costs(
    groups: Sequence[LayerGroup], manifest: Manifest, c: Constraints
) -> tuple[CostModel, dict[int, bool], Constraints]:
    """The manifest's cost model, its groups' prunable flags and ``c`` with its ignored layers.

    Raises:
        InvalidInputError: a group the manifest does not cover.
    """
    cost = CostModel.from_manifest(manifest)
    prunable = {g.id: g.prunable for g in manifest.groups}
    if any(g.group_id is None for g in groups):
        names = [g.name for g in groups if g.group_id is None]
        raise InvalidInputError(
            f"the manifest does not cover layers {', '.join(names[:5])}",
            hint="Rebuild the manifest from the model this checkpoint belongs to.",
        )
    return cost, prunable, c.model_copy(update={"ignored": sorted({*c.ignored, *manifest.ignored})})


def _edges_kept(groups: Sequence[LayerGroup]) -> dict[int, bool]:
    """Without a manifest: the stem is the first layer in order, and a group nothing reads is a
    model output (classifier or head), whose channels are never removed. Transformer groups
    (neurons, heads) hold their own consumers. Recurrent units: their consumers' inputs and the
    module's one hidden_size need a manifest."""
    consumed = infer_consumers(groups)
    plain = [i for i, g in enumerate(groups) if g.unit == "channels"]
    edge = {i: False for i in plain if i == plain[0] or i not in consumed}
    edge |= {i: False for i, g in enumerate(groups) if g.unit == "hidden"}
    return edge
