"""The planning methods as strategies: what :func:`graphs.planner.make_plan` asks each one.

A strategy answers, for one plan:

* ``allocate``: what the method removes by its own rule before any uniform remainder
  (:class:`graphs.allocation.Allocation`): the graph methods by SRP's greedy rule on their
  redundancy (or, given counts, their redundant filters first), the baselines nothing;
* ``removed_at``: how many channels a group loses at the uniform level ``rho`` in [0, 1] that
  the planner bisects (the graph methods' fallback and the baselines' whole rule: that share of
  what the group may still lose; ``ci``: CHIP's threshold at ``rho`` times its largest alpha);
* ``select``: which channels, in original indices, once the planner has fixed how many;
* ``rationale`` (per group) and ``rule`` (per plan): what the plan says about it;
* ``parameters``: the method's parameters recorded in the plan.

Adding a method = one strategy in :data:`STRATEGIES` (and its name in
:data:`graphs.plan.PlanMethod`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from graphs.allocation import Allocation, Budget, fixed_allocation, redundancy_allocation
from graphs.baselines import fpgm
from graphs.cache import Cache
from graphs.error_allocation import Counts
from graphs.errors import InvalidInputError
from graphs.features import Activations, group_features
from graphs.layers import LayerGroup
from graphs.options import AnalysisOptions, layer_seed
from graphs.plan import PLAN_METHODS, PlanMethod
from graphs.selection import GroupState, HscState, MrpState, SrrState
from graphs.work import GroupWork

__all__ = [
    "GRAPH_METHODS",
    "STRATEGIES",
    "CiStrategy",
    "GraphStrategy",
    "PlanInputs",
    "Strategy",
    "UniformStrategy",
    "strategy_for",
]

Parameters = dict[str, float | int | str]


@dataclass(frozen=True)
class PlanInputs:
    """One plan's groups and settings, as every strategy sees them.

    Attributes:
        groups: cost id → group, in plan order.
        limit: cost id → most channels the group may lose (0: kept whole).
        budget: the running cost and the target (the greedy rule updates it).
        counts: channels to remove per group decided elsewhere (:mod:`graphs.error_allocation`).
        activations: feature maps per layer (samples, channels, pixels), or None.
    """

    groups: Mapping[int, LayerGroup]
    limit: Mapping[int, int]
    budget: Budget
    options: AnalysisOptions
    seed: int
    step: float
    cache: Cache | None
    activations: Activations | None
    counts: Counts | None

    def works(self) -> dict[int, GroupWork]:
        """The work of every group that may lose channels."""
        return {gid: self._work(g) for gid, g in self.groups.items() if self.limit[gid]}

    def _work(self, g: LayerGroup) -> GroupWork:
        maps = group_features(g, self.activations) if self.activations is not None else None
        return GroupWork(g, seed=self.seed, options=self.options, cache=self.cache, features=maps)


def _sorted(order: np.ndarray, n: int) -> list[int]:
    return sorted(int(i) for i in order[:n])


def l1_order(g: LayerGroup) -> np.ndarray:
    """The group's filters by increasing L1 norm (ties by index), shape (n_filters,)."""
    X = g.vectors()
    idx = np.arange(X.shape[0])
    return idx[np.lexsort((idx, np.abs(X).sum(axis=1)))]


def fpgm_order(g: LayerGroup) -> np.ndarray:
    """The group's filters by increasing distance to the geometric median (ties by index)."""
    X = g.vectors()
    idx = np.arange(X.shape[0])
    return idx[np.lexsort((idx, fpgm(X).gm_distance))]


def random_order(g: LayerGroup, seed: int) -> np.ndarray:
    """A permutation of the group's filters from the group's own seed."""
    return np.random.default_rng(layer_seed(seed, g.name)).permutation(g.n_filters)


class Strategy(ABC):
    """How one method plans (see the module docstring); one instance per method, stateless:
    what a plan computes lives in the :class:`~graphs.allocation.Allocation` it returns."""

    method: PlanMethod
    graph = False  # a redundancy-graph method (mrp, srr, hsc): greedy, then uniform fallback
    least_squares_choice = False  # with statistics: the least-squares path chooses (mrp)

    def allocate(self, inputs: PlanInputs) -> Allocation:
        """What the method removes by its own rule before the uniform remainder (default:
        nothing)."""
        return Allocation.empty(list(inputs.groups))

    def removed_at(self, alloc: Allocation, gid: int, rho: float, *, base: int, limit: int) -> int:
        """Channels of group ``gid`` removed at uniform level ``rho``, before rounding (default:
        what the method's rule took, ``base``, and ``rho`` of what the group may still lose)."""
        return base + math.ceil(rho * (limit - base) - 1e-9)

    @abstractmethod
    def select(self, inputs: PlanInputs, alloc: Allocation, gid: int, n_remove: int) -> list[int]:
        """The ``n_remove`` channels group ``gid`` loses: sorted original indices."""

    @abstractmethod
    def rationale(self, alloc: Allocation, gid: int, *, greedy: int, extra: int) -> str:
        """Why a prunable group loses what it loses: ``greedy`` channels by the method's rule,
        ``extra`` by the uniform remainder."""

    @abstractmethod
    def rule(self, alloc: Allocation, *, greedy: int, fallback: int) -> str:
        """The plan's rule: ``greedy`` channels by the method's rule in all, ``fallback`` by the
        uniform remainder."""

    def parameters(self, options: AnalysisOptions, step: float) -> Parameters:
        """The parameters the plan records: the method's (:meth:`AnalysisOptions.parameters`)
        and the greedy ``step``."""
        return {**options.parameters(self.method), "step": step}


@dataclass(frozen=True)
class UniformStrategy(Strategy):
    """l1, fpgm, random: one uniform ratio, filters by the method's ``order``."""

    method: PlanMethod
    rank: Callable[[LayerGroup, int], np.ndarray]  # (group, seed) -> filters, first removed first

    def select(self, inputs: PlanInputs, alloc: Allocation, gid: int, n_remove: int) -> list[int]:
        if n_remove <= 0:
            return []
        return _sorted(self.rank(inputs.groups[gid], inputs.seed), n_remove)

    def rationale(self, alloc: Allocation, gid: int, *, greedy: int, extra: int) -> str:
        return f"{self.method}: uniform ratio"

    def rule(self, alloc: Allocation, *, greedy: int, fallback: int) -> str:
        return f"{self.method}: uniform ratio by bisection"


@dataclass(frozen=True)
class GraphStrategy(Strategy):
    """mrp, srr, hsc: SRP's greedy rule on the method's redundancy, then the uniform fallback.

    ``state`` builds a group's greedy state (:mod:`graphs.selection`) from its work; ``by_l1``:
    the counts come from the graph, the filters by smallest L1 (srr, as in its paper);
    ``least_squares_choice``: with activation statistics the channels are the first of the
    group's least-squares greedy path instead (mrp, :mod:`graphs.compensated_plan`).
    """

    method: PlanMethod
    state: Callable[[GroupWork], GroupState]
    by_l1: bool = False
    least_squares_choice: bool = False
    graph = True

    def allocate(self, inputs: PlanInputs) -> Allocation:
        works = inputs.works()
        if inputs.counts is not None:
            return fixed_allocation(works, self.state, inputs.counts.removed)
        return redundancy_allocation(
            works,
            self.state,
            limit=dict(inputs.limit),
            budget=inputs.budget,
            step=inputs.step,
            anneal=inputs.options.fallback == "anneal",
        )

    def select(self, inputs: PlanInputs, alloc: Allocation, gid: int, n_remove: int) -> list[int]:
        g, state = inputs.groups[gid], alloc.states.get(gid)
        if n_remove <= 0:
            return []
        if state is None:  # not planned: a group that may lose nothing
            return _sorted(random_order(g, inputs.seed), n_remove)
        if self.by_l1:
            return _sorted(l1_order(g), n_remove)
        if isinstance(state, HscState) and g.n_filters - n_remove < state.result.n_clusters:
            keep = set(state.keep_fewer_than_clusters(g.n_filters - n_remove).tolist())
            return [i for i in range(g.n_filters) if i not in keep]
        chosen = list(alloc.strict_removed.get(gid, [])[:n_remove])
        taken = set(chosen)
        rest = [int(i) for i in state.order() if int(i) not in taken]
        return sorted(chosen + rest[: n_remove - len(chosen)])

    def rationale(self, alloc: Allocation, gid: int, *, greedy: int, extra: int) -> str:
        red = alloc.redundancy[gid]
        text = f"{self.method} redundancy {red:.3f}" if red is not None else self.method
        if greedy:
            text += f"; {greedy} removed as redundant"
        if extra:
            text += f"; {extra} by the uniform fallback"
        return text

    def rule(self, alloc: Allocation, *, greedy: int, fallback: int) -> str:
        text = f"{self.method}: greedy on redundancy removed {greedy} channels"
        if alloc.softer:
            text += f" ({alloc.softer} of them at softer calibration levels)"
        if fallback:
            text += f"; redundancy ran out, uniform fallback removed {fallback} more"
        return text

    def parameters(self, options: AnalysisOptions, step: float) -> Parameters:
        return {**super().parameters(options, step), "fallback": options.fallback}


@dataclass
class CiAllocation(Allocation):
    """ci's allocation: nothing removed by itself, the channels' independence per group.

    Attributes:
        ci: group id → channel independence of its channels, shape (n_filters,).
        alpha_max: the largest max/mean of a group's CI (the threshold's top).
    """

    ci: dict[int, np.ndarray] = field(default_factory=dict)
    alpha_max: float = 1.0


@dataclass(frozen=True)
class CiStrategy(Strategy):
    """ci, CHIP's adaptive rule: keep the channels whose CI is at least alpha times their
    layer's mean CI, one alpha for all layers (bisected through ``rho``)."""

    method: PlanMethod = "ci"

    def allocate(self, inputs: PlanInputs) -> CiAllocation:
        ci = {gid: w.ci().ci for gid, w in inputs.works().items()}
        top = max((float(v.max() / v.mean()) for v in ci.values() if v.mean() > 0), default=1.0)
        return replace(CiAllocation.empty(list(inputs.groups)), ci=ci, alpha_max=top)

    def removed_at(self, alloc: Allocation, gid: int, rho: float, *, base: int, limit: int) -> int:
        ci = _ci(alloc)
        if gid not in ci.ci:
            return 0
        v = ci.ci[gid]
        below = int(np.sum(v < rho * ci.alpha_max * 1.000001 * v.mean())) if v.mean() > 0 else 0
        return min(limit, below)

    def select(self, inputs: PlanInputs, alloc: Allocation, gid: int, n_remove: int) -> list[int]:
        ci = _ci(alloc).ci
        n = inputs.groups[gid].n_filters
        order = np.lexsort((np.arange(n), ci[gid])) if gid in ci else np.zeros(0)
        return _sorted(order, n_remove)

    def rationale(self, alloc: Allocation, gid: int, *, greedy: int, extra: int) -> str:
        return "ci: the channels of lowest channel independence"

    def rule(self, alloc: Allocation, *, greedy: int, fallback: int) -> str:
        return (
            "ci: keep the channels whose CI is at least alpha times their layer's mean CI, one "
            "alpha for all layers, found by bisection (CHIP's adaptive rule)"
        )


def _ci(alloc: Allocation) -> CiAllocation:
    if not isinstance(alloc, CiAllocation):
        raise TypeError("the ci strategy plans with its own allocation (CiStrategy.allocate)")
    return alloc


def _mrp_state(w: GroupWork) -> GroupState:
    return MrpState(w.fresh_vectors, w.seed, w.graph().graph, resolution=w.options.resolution)


def _srr_state(w: GroupWork) -> GroupState:
    return SrrState(w.fresh_vectors, w.seed, w.graph().graph)


def _hsc_state(w: GroupWork) -> GroupState:
    o = w.options
    return HscState(
        w.fresh_vectors, w.seed, w.hsc(), k=o.k, n_rounds=o.n_rounds, alpha=o.alpha,
        min_explained=o.min_explained,
    )  # fmt: skip


STRATEGIES: dict[PlanMethod, Strategy] = {
    "mrp": GraphStrategy("mrp", _mrp_state, least_squares_choice=True),
    "srr": GraphStrategy("srr", _srr_state, by_l1=True),
    "hsc": GraphStrategy("hsc", _hsc_state),
    "l1": UniformStrategy("l1", lambda g, seed: l1_order(g)),
    "fpgm": UniformStrategy("fpgm", lambda g, seed: fpgm_order(g)),
    "random": UniformStrategy("random", random_order),
    "ci": CiStrategy(),
}
"""Every plan method's strategy, in :data:`graphs.plan.PLAN_METHODS` order."""

GRAPH_METHODS: tuple[PlanMethod, ...] = tuple(m for m, s in STRATEGIES.items() if s.graph)
"""The redundancy-graph methods: mrp, srr, hsc."""


def strategy_for(method: str) -> Strategy:
    """The strategy of ``method``.

    Raises:
        InvalidInputError: an unknown method.
    """
    strategy = STRATEGIES.get(method)  # type: ignore[call-overload]
    if strategy is None:
        raise InvalidInputError(
            f"unknown plan method {method!r}", hint=f"Use one of {', '.join(PLAN_METHODS)}."
        )
    return strategy
