"""How many channels each group loses by redundancy: SRP's greedy rule, at annealed levels.

:func:`redundancy_allocation` is the graph methods' allocation (:mod:`graphs.strategies`):
repeat — in the most redundant group (its method's redundancy of the filters it still keeps),
remove the most replaceable filters (``step`` at a time) and recompute that group only — until
the target is met (:class:`Budget`) or no group has redundancy left. With ``anneal`` the same
rule goes on at softer, still calibrated levels (:mod:`graphs.anneal`), which then decide only
*how many* filters a group loses: *which* ones stay the strict level's choice (its redundant
filters, then its order), because weak or chance similarity is no evidence that a filter is
replaceable (issue 7: choosing by it cost up to 85 points of accuracy before fine-tuning).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Self

from graphs.anneal import anneal_levels
from graphs.cost import CostModel
from graphs.errors import InvalidInputError
from graphs.plan import Constraints, Target
from graphs.selection import GroupState
from graphs.work import GroupWork


class Budget:
    """Kept channels per group with running params/MACs, and the target test."""

    def __init__(self, cost: CostModel, target: Target, ids: Sequence[int]) -> None:
        self.cost, self.target = cost, target
        self.kept = dict(cost.channels)
        self.params0 = cost.params()
        self.macs0 = cost.macs()
        if target.kind == "flops" and self.macs0 is None:
            raise InvalidInputError(
                "a FLOPs target needs the model's output sizes",
                hint="Pass a manifest (prunegraph manifest --model pkg.module:factory "
                "--input-shape 1,3,224,224 -o manifest.json), or use a params target.",
            )
        self.params, self.macs = float(self.params0), float(self.macs0 or 0)
        self.ids = list(ids)

    def set(self, gid: int, kept: int) -> None:
        dp, dm = self.cost.delta(self.kept, gid, kept)
        self.params += dp
        self.macs += dm
        self.kept[gid] = kept

    def achieved(self, kept: dict[int, int] | None = None) -> float:
        if kept is not None:
            if self.target.kind == "flops":
                return 1.0 - (self.cost.macs(kept) or 0) / max(self.macs0 or 1, 1)
            return 1.0 - self.cost.params(kept) / max(self.params0, 1)
        if self.target.kind == "flops":
            return 1.0 - self.macs / max(self.macs0 or 1, 1)
        return 1.0 - self.params / max(self.params0, 1)

    def met(self) -> bool:
        return self.achieved() >= self.target.ratio - 1e-12


def group_limit(n: int, c: Constraints) -> int:
    """Most channels a group of n may lose."""
    return max(0, min(n - c.min_channels, math.floor(c.max_ratio * n)))


StateOf = Callable[[GroupWork], GroupState]
"""A method's greedy state of one group at the group work's calibration level
(:class:`graphs.strategies.GraphStrategy` ``state``)."""


def _state(work: GroupWork, state_of: StateOf) -> GroupState:
    state = state_of(work)
    work.release()  # the state rebuilds the vectors when it needs them: one group at a time
    return state


@dataclass
class Allocation:
    """What the greedy rule removed.

    Attributes:
        removed: group id → filters removed, at every level (their number is the allocation).
        redundancy: group id → the strict level's redundancy (None: not planned).
        states: group id → the strict level's state after its removals (orders the rest).
        strict_removed: group id → the filters removed at the strict level (removed first).
        softer: how many filters the softer levels removed, in all.
    """

    removed: dict[int, list[int]]
    redundancy: dict[int, float | None]
    states: dict[int, GroupState]
    strict_removed: dict[int, list[int]]
    softer: int = 0

    @classmethod
    def empty(cls, ids: Sequence[int]) -> Self:
        return cls({gid: [] for gid in ids}, dict.fromkeys(ids), {}, {})


def redundancy_allocation(
    works: dict[int, GroupWork],
    state_of: StateOf,
    *,
    limit: dict[int, int],
    budget: Budget,
    step: float,
    anneal: bool,
) -> Allocation:
    """SRP over the groups of ``works`` (only those that may lose channels), level by level.

    Args:
        works: group id → its work at the user's (strict) calibration level.
        state_of: the method's greedy state of a group (mrp, srr, hsc: :mod:`graphs.selection`).
        limit: group id → most filters it may lose (constraints).
        budget: the running cost and target; updated as filters go.
        step: filters per greedy iteration (int ≥ 1) or a fraction of the group.
        anneal: go on at the softer levels of :func:`graphs.anneal.anneal_levels`.
    """
    out = Allocation.empty(list(limit))
    levels = {
        gid: anneal_levels(w.options, w.group.n_filters, anneal=anneal) for gid, w in works.items()
    }
    at: dict[int, list[GroupWork]] = {gid: [w] for gid, w in works.items()}
    states: dict[int, GroupState] = {}
    for level in range(max((len(v) for v in levels.values()), default=0)):
        if level == 1:  # softer levels only when strict redundancy ran out (one graph pass)
            for gid, w in at.items():
                at[gid] = [w[0], *w[0].at_levels(levels[gid][1:])]
                for level_work in at[gid]:
                    level_work.release()
        for gid, w in at.items():
            if len(out.removed[gid]) < limit[gid] and level < len(w):
                states[gid] = _state(w[level], state_of)
                states[gid].drop(out.removed[gid])
                if level == 0:
                    out.redundancy[gid] = round(states[gid].redundancy(), 6)
        if level == 0:
            out.states = dict(states)
        if budget.met():
            break
        before = sum(len(r) for r in out.removed.values())
        _greedy(states, out.removed, limit, budget, step)
        if level == 0:
            out.strict_removed = {gid: list(out.removed[gid]) for gid in states}
        else:
            out.softer += sum(len(r) for r in out.removed.values()) - before
    return out


def _greedy(
    states: dict[int, GroupState],
    removed: dict[int, list[int]],
    limit: dict[int, int],
    budget: Budget,
    step: float,
) -> None:
    """SRP at one calibration level: remove the most replaceable filters of the most redundant
    group (``step`` at a time), until the target is met or no group has redundancy left."""
    while not budget.met():
        live = [
            gid for gid, st in states.items()
            if len(removed[gid]) < limit[gid] and st.redundant_count() > 0
        ]  # fmt: skip
        if not live:
            return
        gid = max(live, key=lambda i: (states[i].redundancy(), -i))
        n_now = int(states[gid].alive.sum())
        n = int(step) if step >= 1 else max(1, round(step * n_now))
        took = states[gid].take(min(n, limit[gid] - len(removed[gid])))
        if not took:
            return
        removed[gid].extend(took)
        budget.set(gid, budget.cost.channels[gid] - len(removed[gid]))


def fixed_allocation(
    works: dict[int, GroupWork], state_of: StateOf, counts: dict[int, int]
) -> Allocation:
    """Counts decided elsewhere (:mod:`graphs.error_allocation`): each group's state takes its
    redundant filters first (at most its count); the plan fills the rest by the state's order."""
    out = Allocation.empty(list(counts))
    for gid, w in works.items():
        state = _state(w, state_of)
        out.redundancy[gid] = round(state.redundancy(), 6)
        took = state.take(counts.get(gid, 0)) if counts.get(gid, 0) > 0 else []
        out.removed[gid] = list(took)
        out.strict_removed[gid] = list(took)
        out.states[gid] = state
    return out
