"""How many channels each group loses when compensation is planned (issue 14, point 4).

Each rule gives a removal count per group as a function of one level, and the level is found by
bisection so that the FLOPs/params target is met with the fewest removals:

* ``uniform`` (a): the same fraction of what each group may lose (level = the fraction);
* ``functional`` (b): SRP on functional redundancy — every group loses the channels its error
  curve removes within one common relative error (level = that error, so the group with the
  most functional redundancy loses the most, and a group without any loses channels only once
  the others cost as much);
* ``marginal`` (c): equal marginal error per MAC — group g removes the k minimizing
  ``w_g · error_g(k) − λ · k · macs_g`` (level = λ; ``macs_g`` the MACs one channel of g
  saves in the unpruned model), with ``w_g`` a per-group currency (default 1: the summed
  relative consumer error; pass measured sensitivities to weight groups by what their error
  does to the model's output).

Groups without an error curve (no consumer statistics) lose nothing under ``functional`` and
``marginal``.

:func:`sensitivity_weights` turns a measured sensitivity table (``clients.sensitivity`` as JSON,
one group pruned alone at a few fractions with compensation, measured on *calibration* data)
into the ``marginal`` currency: ``w_g`` = measured output change / predicted relative consumer
error at the same removal, so ``w_g · error_g(k)`` estimates the model-level damage of removing
``k`` channels of ``g`` (a relative error is not worth the same at every depth).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphs.allocation import Budget
from graphs.cost import CostModel
from graphs.errors import InvalidInputError
from graphs.functional import ErrorCurve
from graphs.plan import ALLOCATION_RULES, AllocationRule, Target


@dataclass(frozen=True)
class Counts:
    """Channels to remove per group id, and the rule that chose them (for the plan's ``rule``)."""

    removed: dict[int, int]
    rule: str


def _rounded(n: int, r: int, round_to: int | None) -> int:
    if r <= 0 or not round_to or round_to == 1:
        return max(r, 0)
    return n - min(n, math.ceil((n - r) / round_to) * round_to)


def _solve(
    cost: CostModel,
    target: Target,
    limit: Mapping[int, int],
    at: Callable[[float], dict[int, int]],
    lo: float,
    hi: float,
    *,
    log: bool,
    round_to: int | None,
) -> tuple[dict[int, int], float]:
    """Smallest level in [lo, hi] whose counts meet the target (hi when none does)."""
    budget = Budget(cost, target, list(limit))

    def counts(level: float) -> dict[int, int]:
        raw = at(level)
        return {
            gid: _rounded(cost.channels[gid], min(limit[gid], raw.get(gid, 0)), round_to)
            for gid in limit
        }

    def met(level: float) -> bool:
        c = counts(level)
        kept = {**budget.kept, **{gid: cost.channels[gid] - r for gid, r in c.items()}}
        return budget.achieved(kept) >= target.ratio - 1e-12

    if not met(hi):
        return counts(hi), hi
    for _ in range(60):
        mid = math.sqrt(lo * hi) if log else (lo + hi) / 2
        if met(mid):
            hi = mid
        else:
            lo = mid
    return counts(hi), hi


def allocate(
    rule: AllocationRule,
    *,
    cost: CostModel,
    target: Target,
    limit: Mapping[int, int],
    curves: Mapping[int, ErrorCurve],
    round_to: int | None = None,
    weights: Mapping[int, float] | None = None,
) -> Counts:
    """Removal counts per group by ``rule`` (not ``method``: that is the plan's own rule).

    Args:
        limit: group id → most channels it may lose (0: not pruned).
        curves: group id → its error curve (:func:`graphs.functional.error_curve`).
        weights: ``marginal`` only: group id → currency weight (default 1).
    """
    if rule == "uniform":
        got, level = _solve(
            cost, target, limit,
            lambda rho: {g: math.ceil(rho * n - 1e-9) for g, n in limit.items()},
            0.0, 1.0, log=False, round_to=round_to,
        )  # fmt: skip
        return Counts(got, f"uniform: {level:.4f} of what each group may lose")
    if rule == "functional":

        def within(eps: float) -> dict[int, int]:
            return {g: c.removable(eps) for g, c in curves.items() if g in limit}

        got, level = _solve(cost, target, limit, within, 1e-9, 1e3, log=True, round_to=round_to)
        return Counts(got, f"functional: every group within relative error {level:.3g}")
    if rule == "marginal":
        full = dict(cost.channels)
        per: dict[int, float] = {}
        for g in curves:
            if limit.get(g, 0) > 0:
                _, dm = cost.delta(full, g, full[g] - 1)
                per[g] = max(-float(dm), 1e-12)
        w = {g: float((weights or {}).get(g, 1.0)) for g in per}
        if any(not (np.isfinite(v) and v >= 0) for v in w.values()):
            raise InvalidInputError("allocation weights must be finite and >= 0")

        def priced(lam: float) -> dict[int, int]:
            out = {}
            for g, m in per.items():
                e = curves[g].errors[: limit[g] + 1]
                out[g] = int(np.argmin(w[g] * e - lam * m * np.arange(e.size)))
            return out

        got, level = _solve(cost, target, limit, priced, 1e-15, 1e3, log=True, round_to=round_to)
        return Counts(got, f"marginal: equal error per MAC ({level:.3g} per MAC)")
    raise InvalidInputError(
        f"unknown allocation {rule!r}",
        hint=f"Use one of {', '.join(ALLOCATION_RULES)}.",
    )


MIN_PREDICTED_ERROR = 1e-9  # rows whose predicted error is below this say nothing about w_g


@dataclass(frozen=True)
class SensitivityWeights:
    """Per-group currency of the ``marginal`` allocation from a sensitivity table.

    ``weights``: group id → w_g for every group with an error curve; ``measured``: the groups
    whose w_g came from the table; ``filled``: the others (no usable row), given the median of
    the measured weights.
    """

    weights: dict[int, float]
    measured: tuple[int, ...]
    filled: tuple[int, ...]


def _table_rows(table: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if not isinstance(table, Mapping) or not isinstance(table.get("rows"), list):
        raise InvalidInputError(
            "a sensitivity table is a JSON object with a 'rows' list",
            hint="Write it with clients.sensitivity(...).to_json().",
        )
    order = table.get("order", "functional")
    if order != "functional":
        raise InvalidInputError(
            f"the sensitivity table removed channels in {order!r} order; the error curves "
            "predict the greedy least-error path",
            hint="Measure it with clients.sensitivity(..., order='functional', stats=...).",
        )
    rows = [r for r in table["rows"] if isinstance(r, Mapping) and r.get("compensated") is True]
    return sorted(rows, key=lambda r: (str(r.get("group")), str(r.get("removed"))))


def sensitivity_weights(
    table: Mapping[str, Any],
    curves: Mapping[int, ErrorCurve],
    *,
    channels: Mapping[int, int],
) -> SensitivityWeights:
    """``marginal`` weights from a sensitivity table (``clients.sensitivity(...).to_json()``).

    For each group with an error curve, ``w_g = Σ |delta| / Σ error_g(removed)`` over the
    table's compensated rows of that group (rows whose predicted error is below
    :data:`MIN_PREDICTED_ERROR` are skipped): the measured change of the metric per unit of
    predicted relative consumer error. Use a metric that is 0 for the unpruned model and
    grows with the damage (e.g. mean KL(unpruned ‖ pruned) on calibration inputs); with an
    accuracy, ``|delta|`` is its drop. Measure it **cross-fitted**: folds from the statistics
    of some calibration images, the metric on others. In-sample (folds and metric on the same
    images) a fold of a wide, low-resolution layer looks nearly free; on MobileNetV2 that
    gave the deep 960-wide groups 10–400× too small weights and lost 33 points of top-1
    agreement at −10 % FLOPs (benchmarks/fidelity/currency/).

    Args:
        table: the parsed JSON (keys ``order``, ``rows``; each row ``group``, ``channels``,
            ``removed``, ``compensated``, ``delta``).
        curves: group id → error curve (:func:`graphs.functional.error_curve`), as the planner
            computes them (up to the most channels a group may lose).
        channels: group id → channel count of the model's manifest (every group).

    Raises:
        InvalidInputError: not a table, not ``order="functional"``, no compensated row, a row
            naming an unknown group or a different channel count, a non-finite delta, or a
            removal beyond the channel count.
    """
    rows = _table_rows(table)
    if not rows:
        raise InvalidInputError(
            "the sensitivity table has no compensated rows",
            hint="Measure it with clients.sensitivity(..., compensation=(True,), stats=...).",
        )
    num: dict[int, float] = {}
    den: dict[int, float] = {}
    for r in rows:
        try:
            gid, n, k, delta = int(r["group"]), int(r["channels"]), int(r["removed"]), r["delta"]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(
                f"a sensitivity row lacks group/channels/removed/delta: {dict(r)}",
                hint="Write the table with clients.sensitivity(...).to_json().",
            ) from exc
        if channels.get(gid) != n:
            raise InvalidInputError(
                f"sensitivity row for group {gid} ({n} channels) does not match the manifest "
                f"({channels.get(gid, 'no such group')})",
                hint="Measure the table on the same model the plan is for.",
            )
        if not (isinstance(delta, int | float) and math.isfinite(delta)) or not 0 < k < n:
            raise InvalidInputError(
                f"sensitivity row for group {gid}: delta {delta!r}, removed {k} of {n}",
                hint="Deltas are finite numbers and 0 < removed < channels.",
            )
        curve = curves.get(gid)
        if curve is None or k >= curve.errors.size:
            continue
        e = float(curve.errors[k])
        if e >= MIN_PREDICTED_ERROR:
            num[gid] = num.get(gid, 0.0) + abs(float(delta))
            den[gid] = den.get(gid, 0.0) + e
    measured = {g: num[g] / den[g] for g in sorted(den)}
    if not measured:
        raise InvalidInputError(
            "no row of the sensitivity table matches a group with an error curve",
            hint="Measure the groups the plan prunes (the manifest's prunable groups).",
        )
    fill = float(np.median(list(measured.values())))
    filled = tuple(g for g in sorted(curves) if g not in measured)
    weights = {g: measured.get(g, fill) for g in sorted(curves)}
    return SensitivityWeights(weights, tuple(measured), filled)
