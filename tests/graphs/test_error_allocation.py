"""Allocation (c) with a sensitivity-weighted currency: invariants of ``marginal`` weights and of
:func:`graphs.error_allocation.sensitivity_weights` (issue 14 point 4)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

from graphs.cost import CostModel
from graphs.error_allocation import allocate, sensitivity_weights
from graphs.errors import InvalidInputError
from graphs.functional import ErrorCurve
from graphs.manifest import ChannelGroup, Manifest, ManifestLayer, ModuleCost, ParamAxis
from graphs.plan import Target

N = 16  # channels of each prunable group


def _manifest() -> Manifest:
    """conv a (N×3) → conv b (N×N) → conv c (N×N) → fc (4×N): groups 0, 1, 2 prunable."""
    shapes = {
        "a.weight": [N, 3, 1, 1], "b.weight": [N, N, 1, 1], "c.weight": [N, N, 1, 1],
        "fc.weight": [4, N],
    }  # fmt: skip
    names = ["a", "b", "c"]
    groups = [
        ChannelGroup(
            id=i,
            channels=N,
            producers=[n],
            params=[
                ParamAxis(param=f"{n}.weight", axis=0),
                ParamAxis(param=f"{nxt}.weight", axis=1),
            ],
        )
        for i, (n, nxt) in enumerate(zip(names, ["b", "c", "fc"], strict=True))
    ]
    groups.append(
        ChannelGroup(id=3, channels=4, producers=["fc"], params=[], prunable=False, reason="out")
    )
    macs = {"a": N * 3 * 64, "b": N * N * 64, "c": N * N * 64, "fc": 4 * N}
    ins = {"a": None, "b": 0, "c": 1, "fc": 2}
    return Manifest(
        input_shapes=[[1, 3, 8, 8]],
        params_total=sum(int(np.prod(s)) for s in shapes.values()),
        macs_total=sum(macs.values()),
        param_shapes=shapes,
        layers=[
            *(
                ManifestLayer(
                    name=n, kind="conv2d", weight_shape=shapes[f"{n}.weight"], out_spatial=64
                )
                for n in names
            ),
            ManifestLayer(
                name="fc", kind="linear", weight_shape=[4, N], out_spatial=1, role="classifier"
            ),
        ],
        groups=groups,
        costs=[
            ModuleCost(name=n, macs=macs[n], out_group=i, in_group=ins[n])
            for i, n in enumerate([*names, "fc"])
        ],
        ignored=["fc"],
    )


def _curves(scales: tuple[float, ...] = (1.0, 2.0, 0.5)) -> dict[int, ErrorCurve]:
    """Convex error curves (errors[k] ∝ k²), one scale per group."""
    k = np.arange(N, dtype=np.float64)
    return {
        g: ErrorCurve(order=np.arange(N - 1), errors=s * (k / N) ** 2, channels=N)
        for g, s in enumerate(scales)
    }


def _setup() -> tuple[CostModel, dict[int, int], dict[int, ErrorCurve]]:
    return CostModel.from_manifest(_manifest()), {0: N - 1, 1: N - 1, 2: N - 1}, _curves()


def _marginal(weights: dict[int, float] | None, target: float = 0.3) -> dict[int, int]:
    cost, limit, curves = _setup()
    return allocate(
        "marginal",
        cost=cost,
        target=Target(flops=target),
        limit=limit,
        curves=curves,
        weights=weights,
    ).removed


def _table(
    per_group: dict[int, float], *, removed: tuple[int, ...] = (2, 4), order: str = "functional"
) -> dict[str, Any]:
    """A clients.sensitivity JSON table whose delta is ``per_group[g]`` × predicted error."""
    curves = _curves()
    rows = [
        {
            "group": g, "name": f"n{g}", "producers": [f"n{g}"], "channels": N,
            "fraction": k / N, "removed": k, "compensated": comp,
            "metric": m * float(curves[g].errors[k]), "delta": m * float(curves[g].errors[k]),
        }
        for g, m in per_group.items()
        for k in removed
        for comp in (False, True)
    ]  # fmt: skip
    return {"baseline": 0.0, "order": order, "seed": 0, "skipped": {}, "rows": rows}


CHANNELS = {0: N, 1: N, 2: N, 3: 4}


def test_equal_weights_reproduce_plain_marginal_exactly() -> None:
    plain = _marginal(None)
    assert sum(plain.values()) > 0
    assert _marginal({0: 1.0, 1: 1.0, 2: 1.0}) == plain
    assert _marginal({0: 4.0, 1: 4.0, 2: 4.0}) == plain  # only relative weights matter


def test_a_group_weighted_higher_loses_less() -> None:
    plain = _marginal(None)
    heavy = _marginal({0: 1.0, 1: 8.0, 2: 1.0})
    assert heavy[1] < plain[1]
    assert heavy[0] >= plain[0] and heavy[2] >= plain[2]
    assert sum(heavy.values()) > heavy[1]


def test_weights_are_measured_change_per_predicted_error() -> None:
    sw = sensitivity_weights(_table({0: 3.0, 1: 0.5, 2: 7.0}), _curves(), channels=CHANNELS)
    assert sw.weights == pytest.approx({0: 3.0, 1: 0.5, 2: 7.0})
    assert sw.measured == (0, 1, 2) and sw.filled == ()


def test_a_table_proportional_to_prediction_gives_plain_marginal() -> None:
    sw = sensitivity_weights(_table({0: 2.0, 1: 2.0, 2: 2.0}), _curves(), channels=CHANNELS)
    assert _marginal(sw.weights) == _marginal(None)


def test_a_more_sensitive_group_loses_less_through_the_table() -> None:
    sw = sensitivity_weights(_table({0: 1.0, 1: 10.0, 2: 1.0}), _curves(), channels=CHANNELS)
    assert _marginal(sw.weights)[1] < _marginal(None)[1]


def test_groups_without_rows_get_the_median_weight() -> None:
    sw = sensitivity_weights(_table({0: 1.0, 2: 5.0}), _curves(), channels=CHANNELS)
    assert sw.filled == (1,)
    assert sw.weights[1] == pytest.approx(3.0)


def test_deterministic_and_independent_of_row_order() -> None:
    table = _table({0: 3.0, 1: 0.5, 2: 7.0}, removed=(1, 3, 5))
    first = sensitivity_weights(table, _curves(), channels=CHANNELS)
    shuffled = copy.deepcopy(table)
    np.random.default_rng(0).shuffle(shuffled["rows"])
    assert sensitivity_weights(table, _curves(), channels=CHANNELS) == first
    assert sensitivity_weights(shuffled, _curves(), channels=CHANNELS) == first


def _broken(change: dict[str, Any]) -> dict[str, Any]:
    table = _table({0: 1.0, 1: 1.0})
    for r in table["rows"]:
        r.update(change)
    return table


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ([], "JSON object with a 'rows' list"),
        ({"order": "functional"}, "JSON object with a 'rows' list"),
        (_table({0: 1.0}, order="l1"), "greedy least-error path"),
        (_broken({"compensated": False}), "no compensated rows"),
        (_broken({"group": 9}), "does not match the manifest"),
        (_broken({"channels": N + 1}), "does not match the manifest"),
        (_broken({"delta": float("nan")}), "delta nan"),
        (_broken({"delta": "big"}), "delta 'big'"),
        (_broken({"removed": N}), f"removed {N} of {N}"),
        (_broken({"removed": None}), "lacks group/channels/removed/delta"),
        (_broken({"group": 3, "channels": 4, "removed": 1}), "no row of the sensitivity table"),
    ],
)
def test_bad_tables_are_refused_with_a_hint(table: Any, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match) as info:
        sensitivity_weights(table, _curves(), channels=CHANNELS)
    assert (
        "clients.sensitivity" in info.value.hint
        or "model" in info.value.hint
        or ("removed" in info.value.hint or "groups" in info.value.hint)
    )
