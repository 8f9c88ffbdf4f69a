"""Pruning plans: how many channels each group loses, and which, to reach a target (design §4).

Allocation per method:

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

import numpy as np

from graphs.allocation import (
    Allocation,
    Budget,
    fixed_allocation,
    group_limit,
    redundancy_allocation,
)
from graphs.baselines import fpgm
from graphs.cache import Cache
from graphs.compensated_plan import plan_with_stats
from graphs.cost import CostModel, infer_consumers
from graphs.error_allocation import Counts
from graphs.errors import InvalidInputError, NoPrunableLayersError
from graphs.features import Activations, group_features
from graphs.grouping import build_groups
from graphs.layers import LayerGroup, LayerWeights
from graphs.manifest import Manifest
from graphs.options import (
    DEFAULT_EPSILON,
    DEFAULT_RIDGE,
    AnalysisOptions,
    check_features,
    layer_seed,
)
from graphs.plan import AllocationRule, Constraints, GroupPlan, PlanMethod, PruningPlan, Target
from graphs.recurrent import hidden_kept
from graphs.selection import GroupState, HscState
from graphs.transformer import adapt_manifest, plan_fields
from graphs.work import GroupWork

GRAPH_METHODS = ("mrp", "srr", "hsc")


def _baseline_order(group: LayerGroup, method: str, seed: int) -> np.ndarray:
    X = group.vectors()
    n = X.shape[0]
    idx = np.arange(n)
    if method == "l1":
        return idx[np.lexsort((idx, np.abs(X).sum(axis=1)))]
    if method == "fpgm":
        return idx[np.lexsort((idx, fpgm(X).gm_distance))]
    return np.random.default_rng(layer_seed(seed, group.name)).permutation(n)


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
    """A plan that removes ``target`` of the FLOPs or params by ``method``.

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
    check_features([method], opts, activations)
    if not (step >= 1 and float(step).is_integer()) and not 0 < step < 1:
        raise InvalidInputError(f"step must be an integer >= 1 or a fraction in (0, 1), got {step}")
    ids = [g.group_id if g.group_id is not None else i for i, g in enumerate(groups)]
    ok = {
        gid: (prunable or {}).get(gid, True)
        and not any(m.name in c.ignored for m in g.producers)
        and not (activations is not None and g.unit == "hidden")  # no maps: kept whole
        for gid, g in zip(ids, groups, strict=True)
    }
    budget = Budget(cost, target, ids)
    limit = {
        gid: group_limit(g.n_filters, c) if ok[gid] else 0
        for gid, g in zip(ids, groups, strict=True)
    }

    def work(g: LayerGroup) -> GroupWork:
        maps = group_features(g, activations) if activations is not None else None
        return GroupWork(g, seed=seed, options=opts, cache=cache, features=maps)

    ci: dict[int, np.ndarray] = {}
    if method == "ci":  # CHIP's adaptive rule: keep CI >= alpha * mean(CI), one alpha for all
        ci = {gid: work(g).ci().ci for gid, g in zip(ids, groups, strict=True) if limit[gid]}
    alpha_max = max((float(v.max() / v.mean()) for v in ci.values() if v.mean() > 0), default=1)

    def below(gid: int, rho: float) -> int:
        """Channels of a group under the ci rule's threshold at alpha = rho · alpha_max."""
        v = ci[gid]
        return int(np.sum(v < rho * alpha_max * 1.000001 * v.mean())) if v.mean() > 0 else 0

    alloc = Allocation.empty(ids)
    if method in GRAPH_METHODS and counts is not None:
        works = {gid: work(g) for gid, g in zip(ids, groups, strict=True) if limit[gid]}
        alloc = fixed_allocation(works, method, counts.removed)
    elif method in GRAPH_METHODS:
        works = {gid: work(g) for gid, g in zip(ids, groups, strict=True) if limit[gid]}
        alloc = redundancy_allocation(
            works, method, limit=limit, budget=budget, step=step, anneal=opts.fallback == "anneal"
        )
    removed, redundancy, states = alloc.removed, alloc.redundancy, alloc.states
    # Uniform remainder (the baselines' whole rule; the graph methods' fallback): one ratio of
    # what each group may still lose, on top of what redundancy already took. round_to is part
    # of it, so rounding never leaves the target unmet when it can be met.
    base = {gid: len(removed[gid]) for gid in ids}
    step_of = c.round_to or 1

    def rounded(gid: int, r: int) -> int:
        if r <= 0 or step_of == 1:
            return max(r, 0)
        n = cost.channels[gid]
        return n - min(n, math.ceil((n - r) / step_of) * step_of)

    def kept_at(rho: float) -> dict[int, int]:
        out = dict(budget.kept)
        for gid in ids:
            if counts is not None:
                r = min(limit[gid], counts.removed.get(gid, 0))
            elif method == "ci":
                r = min(limit[gid], below(gid, rho)) if gid in ci else 0
            else:
                r = base[gid] + math.ceil(rho * (limit[gid] - base[gid]) - 1e-9)
            out[gid] = cost.channels[gid] - rounded(gid, r)
        return out

    final = kept_at(0.0)
    if budget.achieved(final) < target.ratio and counts is None:
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if budget.achieved(kept_at(mid)) >= target.ratio:
                hi = mid
            else:
                lo = mid
        final = kept_at(hi)
    for gid in ids:
        budget.set(gid, final[gid])
    # A ratio moves in whole channels (or round_to blocks) per group: give channels back while
    # the target still holds, most-cut groups first.
    for gid in sorted(ids, key=lambda i: (budget.kept[i] - cost.channels[i], i)):
        top = cost.channels[gid] - rounded(gid, base[gid])
        while counts is None and budget.kept[gid] + step_of <= top:
            budget.set(gid, budget.kept[gid] + step_of)
            if not budget.met():
                budget.set(gid, budget.kept[gid] - step_of)
                break
    extra = {gid: max(cost.channels[gid] - budget.kept[gid] - base[gid], 0) for gid in ids}
    if method == "ci" and counts is None:
        extra = dict.fromkeys(ids, 0)

    # Which filters: per method, original indices.
    plans: list[GroupPlan] = []
    for gid, g in zip(ids, groups, strict=True):
        n_remove = g.n_filters - budget.kept[gid]
        if method == "ci":
            order = np.lexsort((np.arange(g.n_filters), ci[gid])) if gid in ci else np.zeros(0)
            idx = sorted(int(i) for i in order[:n_remove])
        else:
            first = alloc.strict_removed.get(gid, [])
            idx = _choose(g, gid, method, states.get(gid), first, n_remove, seed)
        budget.set(gid, g.n_filters - len(idx))
        plans.append(
            GroupPlan(
                id=gid,
                name=g.name,
                producers=[m.name for m in g.producers],
                channels_before=g.n_filters,
                channels_after=g.n_filters - len(idx),
                remove=idx,
                redundancy=redundancy[gid],
                rationale=hidden_kept(g, ok[gid], activations is not None)
                or _rationale(
                    method, ok[gid], redundancy[gid], min(base[gid], len(idx)), extra[gid]
                ),
                **plan_fields(g),
            )
        )
    shapes = {**(param_shapes or {}), **cost.shapes(budget.kept)}
    params_after = cost.params(budget.kept)
    macs_after = cost.macs(budget.kept)
    achieved = {"params": round(1 - params_after / max(budget.params0, 1), 6)}
    if macs_after is not None and budget.macs0:
        achieved["flops"] = round(1 - macs_after / budget.macs0, 6)
    fallback = sum(extra.values())
    greedy = sum(
        min(base[gid], g.n_filters - budget.kept[gid]) for gid, g in zip(ids, groups, strict=True)
    )
    rule = (
        "ci: keep the channels whose CI is at least alpha times their layer's mean CI, one "
        "alpha for all layers, found by bisection (CHIP's adaptive rule)"
        if method == "ci"
        else f"{method}: uniform ratio by bisection"
        if method not in GRAPH_METHODS
        else f"{method}: greedy on redundancy removed {greedy} channels"
        + (f" ({alloc.softer} of them at softer calibration levels)" if alloc.softer else "")
        + (f"; redundancy ran out, uniform fallback removed {fallback} more" if fallback else "")
    )
    if counts is not None:
        rule = f"{method} chose the channels; counts by {counts.rule}"
    if budget.achieved() < target.ratio - 1e-9:
        rule += f"; target not reachable under the constraints (reached {budget.achieved():.3f})"
    return PruningPlan(
        checkpoint_sha256=checkpoint_sha256,
        method=method,
        target=target,
        constraints=c,
        seed=seed,
        parameters={
            **opts.parameters(method),
            "step": int(step) if step >= 1 else step,
            **({"fallback": opts.fallback} if method in GRAPH_METHODS else {}),
        },
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


def _choose(
    g: LayerGroup,
    gid: int,
    method: str,
    state: GroupState | None,
    greedy: list[int],
    n_remove: int,
    seed: int,
) -> list[int]:
    if n_remove <= 0:
        return []
    if method in ("l1", "fpgm", "random") or state is None:
        return sorted(int(i) for i in _baseline_order(g, method, seed)[:n_remove])
    if method == "srr":  # counts from the graph, filters by smallest L1 (paper)
        return sorted(int(i) for i in _baseline_order(g, "l1", seed)[:n_remove])
    if isinstance(state, HscState) and g.n_filters - n_remove < state.result.n_clusters:
        keep = set(state.keep_fewer_than_clusters(g.n_filters - n_remove).tolist())
        return [i for i in range(g.n_filters) if i not in keep]
    chosen = list(greedy[:n_remove])
    taken = set(chosen)
    rest = [int(i) for i in state.order() if int(i) not in taken]
    return sorted(chosen + rest[: n_remove - len(chosen)])


def _rationale(method: str, ok: bool, red: float | None, greedy: int, extra: int) -> str:
    if not ok:
        return "not pruned (ignored: stem, classifier or the user's choice)"
    if method == "ci":
        return "ci: the channels of lowest channel independence"
    if method not in GRAPH_METHODS:
        return f"{method}: uniform ratio"
    text = f"{method} redundancy {red:.3f}" if red is not None else method
    if greedy:
        text += f"; {greedy} removed as redundant"
    if extra:
        text += f"; {extra} by the uniform fallback"
    return text


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
) -> PruningPlan:
    """Plan for a checkpoint's layers: groups from the manifest (exact params and MACs, its
    stem/classifier/ignored groups kept whole) or, without one, from the layers alone (params
    estimated, coupling ``unknown``, FLOPs targets refused; the first layer in checkpoint order
    and every layer no other layer reads are kept whole as stem and outputs).

    With ``stats`` (consumer module name → input second moment; needs a manifest) see
    :mod:`graphs.compensated_plan` (``group_weights``: the ``marginal`` allocation's currency)."""
    if manifest is not None:
        manifest = adapt_manifest(layers, manifest)  # transformer blocks: one group of vertices
    groups, _ = build_groups(layers, manifest)
    if not groups:
        raise NoPrunableLayersError("no layer of the checkpoint can be planned")
    c = constraints or Constraints()
    if c.ignored:  # names may be layers or containers: expand, and refuse names matching nothing
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
        c = c.model_copy(update={"ignored": sorted(expanded)})
    if manifest is not None:
        cost = CostModel.from_manifest(manifest)
        prunable = {g.id: g.prunable for g in manifest.groups}
        known = {g.group_id for g in groups}
        if None in known:
            names = [g.name for g in groups if g.group_id is None]
            raise InvalidInputError(
                f"the manifest does not cover layers {', '.join(names[:5])}",
                hint="Rebuild the manifest from the model this checkpoint belongs to.",
            )
        c = c.model_copy(update={"ignored": sorted({*c.ignored, *manifest.ignored})})
        shapes = {k: list(v) for k, v in manifest.param_shapes.items()}
        if stats is not None:
            return plan_with_stats(
                make_plan, layers, groups, manifest, stats, method=method, target=target,
                cost=cost, constraints=c, prunable=prunable, options=options,
                activations=activations, compensation=compensation, allocation=allocation,
                epsilon=epsilon, ridge=ridge, weights=group_weights, step=step, seed=seed,
                checkpoint_sha256=checkpoint_sha256, param_shapes=shapes, cache=cache,
            )  # fmt: skip
        return make_plan(
            groups, method=method, target=target, cost=cost, constraints=c, options=options,
            step=step, seed=seed, checkpoint_sha256=checkpoint_sha256, prunable=prunable,
            param_shapes=shapes, cache=cache, activations=activations,
        )  # fmt: skip
    if stats is not None:
        raise InvalidInputError(
            "compensation from activation statistics needs the model's manifest",
            hint="Pass --manifest (prunegraph manifest --model pkg.module:factory "
            "--input-shape 1,3,224,224 -o manifest.json), or plan without statistics.",
        )
    cost = CostModel.from_layers(groups, params_total)
    # Without a manifest: the stem is the first layer in order, and a group nothing reads is a
    # model output (classifier or head), whose channels are never removed. Transformer groups
    # (neurons, heads) hold their own consumers.
    consumed = infer_consumers(groups)
    plain = [i for i, g in enumerate(groups) if g.unit == "channels"]
    edge = {i: False for i in plain if i == plain[0] or i not in consumed}
    # Recurrent units: their consumers' inputs and the module's one hidden_size need a manifest.
    edge |= {i: False for i, g in enumerate(groups) if g.unit == "hidden"}
    return make_plan(
        groups, method=method, target=target, cost=cost, constraints=c, options=options,
        step=step, seed=seed, checkpoint_sha256=checkpoint_sha256, prunable=edge, cache=cache,
        activations=activations,
    )  # fmt: skip
