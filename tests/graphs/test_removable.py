"""The model's removable fraction (graphs.removable) against a slow reference that deletes the
redundant channels' rows and columns from numpy arrays and counts what is left: with a manifest
that couples layers (a residual pair, a depthwise conv, a flatten into a linear, a layer whose
inputs and outputs are the same group) and without one (the planner's estimate)."""

from __future__ import annotations

import numpy as np
import pytest

from graphs.errors import InvalidInputError
from graphs.grouping import build_groups
from graphs.layers import LayerGroup, LayerWeights
from graphs.manifest import ChannelGroup, Manifest, ManifestLayer, ModuleCost, ParamAxis
from graphs.removable import redundant_channels, removable

# name: (shape, out_spatial) of the MAC-counting modules; "norm.*" and "scale" count no MACs
SHAPES = {
    "a.weight": [8, 3, 3, 3], "a.bias": [8], "norm.weight": [8], "norm.bias": [8],
    "b.weight": [8, 8, 1, 1],  # reads the residual stream (group 0) and writes into it
    "c.weight": [6, 8, 3, 3], "c.bias": [6], "d.weight": [6, 1, 3, 3],  # d: depthwise on c
    "e.weight": [5, 24], "e.bias": [5],  # after a flatten of 6×2×2: 4 inputs per channel
    "f.weight": [3, 5], "f.bias": [3],  # the classifier
    "scale": [7],  # touched by no group
}  # fmt: skip
SPATIAL = {"a": 16, "b": 16, "c": 4, "d": 4, "e": 1, "f": 1}
# group id: (channels, producers, [(param, axis, per_channel)])
GROUPS = {
    0: (8, ["a", "b"], [("a.weight", 0, 1), ("a.bias", 0, 1), ("norm.weight", 0, 1),
                        ("norm.bias", 0, 1), ("b.weight", 0, 1), ("b.weight", 1, 1),
                        ("c.weight", 1, 1)]),
    1: (6, ["c", "d"], [("c.weight", 0, 1), ("c.bias", 0, 1), ("d.weight", 0, 1),
                        ("e.weight", 1, 4)]),
    2: (5, ["e"], [("e.weight", 0, 1), ("e.bias", 0, 1), ("f.weight", 1, 1)]),
    3: (3, ["f"], [("f.weight", 0, 1), ("f.bias", 0, 1)]),
}  # fmt: skip
MODULE_GROUPS = {"a": (0, None), "b": (0, 0), "c": (1, 0), "d": (1, None), "e": (2, 1), "f": (3, 2)}
FIXED_MACS = 100  # pools, activations: MACs no channel count scales


def _manifest() -> Manifest:
    kinds = {"e": "linear", "f": "linear"}
    return Manifest(
        input_shapes=[[1, 3, 8, 8]],
        params_total=sum(int(np.prod(s)) for s in SHAPES.values()),
        macs_total=FIXED_MACS + sum(_macs(SHAPES, m) for m in SPATIAL),
        param_shapes=SHAPES,
        layers=[
            ManifestLayer(
                name=m,
                kind=kinds.get(m, "conv2d"),
                weight_shape=SHAPES[f"{m}.weight"],
                groups=6 if m == "d" else 1,
                out_spatial=SPATIAL[m],
                role="classifier" if m == "f" else "stem" if m == "a" else "body",
            )
            for m in SPATIAL
        ],
        groups=[
            ChannelGroup(
                id=gid,
                channels=n,
                producers=prods,
                params=[ParamAxis(param=p, axis=a, per_channel=k) for p, a, k in axes],
                prunable=gid != 3,
                reason="classifier" if gid == 3 else None,
            )
            for gid, (n, prods, axes) in GROUPS.items()
        ],
        costs=[
            ModuleCost(name=m, macs=_macs(SHAPES, m), out_group=o, in_group=i)
            for m, (o, i) in MODULE_GROUPS.items()
        ],
    )


def _macs(shapes: dict[str, list[int]], module: str) -> int:
    """A conv's or linear's MACs from its weight's shape: one MAC per weight per output position."""
    return int(np.prod(shapes[f"{module}.weight"])) * SPATIAL[module]


def _delete(
    shapes: dict[str, list[int]], axes: list[tuple[str, int, int]], gone: np.ndarray
) -> dict[str, list[int]]:
    """Literally delete channels ``gone`` from every (param, axis, per_channel) of a group."""
    arrays = {k: np.zeros(v) for k, v in shapes.items()}
    for param, axis, per in axes:
        idx = (gone[:, None] * per + np.arange(per)).ravel()
        arrays[param] = np.delete(arrays[param], idx, axis=axis)
    return {k: list(a.shape) for k, a in arrays.items()}


def _manifest_groups() -> list[LayerGroup]:
    out = []
    for gid, (n, prods, _) in GROUPS.items():
        members = tuple(
            LayerWeights(
                m,
                "linear" if m in "ef" else "conv2d",
                np.zeros([n, *SHAPES[f"{m}.weight"][1:]]),
                groups=6 if m == "d" else 1,
            )
            for m in prods
        )
        out.append(LayerGroup(prods[0], members, "manifest", gid))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_manifest_figure_equals_deleting_rows_and_columns(seed: int) -> None:
    rng = np.random.default_rng(seed)
    groups = _manifest_groups()
    cuts = [int(rng.integers(0, g.n_filters)) for g in groups]
    red = [k / g.n_filters for k, g in zip(cuts, groups, strict=True)]
    got = removable(groups, red, manifest=_manifest(), params_total=0)

    def after(which: list[int]) -> tuple[int, int]:
        shapes = dict(SHAPES)
        for gid in which:  # the classifier (group 3) keeps its outputs whatever its redundancy
            gone = rng.choice(GROUPS[gid][0], size=cuts[gid], replace=False)
            shapes = _delete(shapes, GROUPS[gid][2], gone)
        params = sum(int(np.prod(s)) for s in shapes.values())
        return params, FIXED_MACS + sum(_macs(shapes, m) for m in SPATIAL)

    p0, m0 = after([])
    p1, m1 = after([0, 1, 2])
    assert got.exact and got.params_removed == p0 - p1
    assert got.flops_removed is not None and abs(got.flops_removed - (m0 - m1)) <= 1
    assert got.params == pytest.approx((p0 - p1) / p0, abs=1e-6)
    assert got.flops == pytest.approx((m0 - m1) / m0, abs=1e-6)
    for entry in got.largest:  # each group's redundant channels alone
        gid = next(g.group_id for g in groups if g.name == entry.name)
        assert gid is not None and gid != 3 and entry.channels == cuts[gid]
        pa, ma = after([gid])
        assert entry.params == pytest.approx((p0 - pa) / p0, abs=1e-6)
        assert entry.flops == pytest.approx((m0 - ma) / m0, abs=1e-6)
    expected = {g.name for g, k in zip(groups[:3], cuts, strict=False) if k > 0}
    assert {e.name for e in got.largest} == expected
    flops = [e.flops or 0.0 for e in got.largest]
    assert flops == sorted(flops, reverse=True)


def test_a_channel_removed_on_both_axes_counts_once() -> None:
    """b's weight loses rows and columns of the same group: kept² entries stay, not
    n² − 2·(n − kept)·n (what counting rows and columns separately would leave)."""
    groups = _manifest_groups()
    red = [0.5, 0.0, 0.0, 0.0]
    got = removable(groups, red, manifest=_manifest(), params_total=0)
    shapes = _delete(dict(SHAPES), GROUPS[0][2], np.arange(4))
    assert shapes["b.weight"] == [4, 4, 1, 1]
    total = sum(int(np.prod(s)) for s in SHAPES.values())
    assert got.params_removed == total - sum(int(np.prod(s)) for s in shapes.values())


def _chain() -> tuple[list[LayerWeights], int]:
    """conv (BN) → conv → depthwise → flatten (6×2×2) → linear → linear (the output)."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape)

    layers = [
        LayerWeights("c1", "conv2d", w(8, 3, 3, 3), bias=w(8), bn="bn1", extra_params=16),
        LayerWeights("c2", "conv2d", w(6, 8, 3, 3), bias=w(6)),
        LayerWeights("dw", "conv2d", w(6, 1, 3, 3), groups=6, groups_source="shape"),
        LayerWeights("fc", "linear", w(5, 24), bias=w(5)),
        LayerWeights("out", "linear", w(3, 5), bias=w(3)),
    ]
    return layers, sum(m.params for m in layers) + 10  # + 10 parameters of no layer


def _chain_reference(cut: dict[str, int]) -> int:
    """Parameters left after deleting ``cut[g]`` channels of c1, c2 (+ dw) and fc."""
    a = {"c1.w": np.zeros((8, 27)), "c1.b": np.zeros(8), "bn1": np.zeros((8, 2)),
         "c2.w": np.zeros((6, 8, 9)), "c2.b": np.zeros(6), "dw.w": np.zeros((6, 9)),
         "fc.w": np.zeros((5, 6, 4)), "fc.b": np.zeros(5), "out.w": np.zeros((3, 5)),
         "out.b": np.zeros(3)}  # fmt: skip
    for key, axis, group in [("c1.w", 0, "c1"), ("c1.b", 0, "c1"), ("bn1", 0, "c1"),
                             ("c2.w", 1, "c1"), ("c2.w", 0, "c2"), ("c2.b", 0, "c2"),
                             ("dw.w", 0, "c2"), ("fc.w", 1, "c2"), ("fc.w", 0, "fc"),
                             ("fc.b", 0, "fc"), ("out.w", 1, "fc")]:  # fmt: skip
        a[key] = np.delete(a[key], np.arange(cut[group]), axis=axis)
    return sum(x.size for x in a.values()) + 10


@pytest.mark.parametrize("seed", range(4))
def test_estimate_without_manifest_equals_deleting_rows_and_columns(seed: int) -> None:
    layers, total = _chain()
    groups, _ = build_groups(layers)
    assert [g.name for g in groups] == ["c1", "c2", "fc", "out"]  # dw goes with c2
    rng = np.random.default_rng(seed)
    red = [float(rng.uniform(0, 1)) for _ in groups]
    got = removable(groups, red, params_total=total)
    cut = {g.name: redundant_channels(r, g.n_filters) for g, r in zip(groups, red, strict=True)}
    assert not got.exact and got.flops is None and got.flops_removed is None
    assert got.params_removed == total - _chain_reference(cut)  # "out" is the model's output
    assert got.params == pytest.approx(got.params_removed / total, abs=1e-6)


def test_outputs_and_zero_redundancy_remove_nothing() -> None:
    layers, total = _chain()
    groups, _ = build_groups(layers)
    got = removable(groups, [0.0, 0.0, 0.0, 1.0], params_total=total)  # only the output
    assert got.params == 0 and got.params_removed == 0 and got.largest == []
    man = removable(_manifest_groups(), [0.0, 0.0, 0.0, 0.9], manifest=_manifest(), params_total=0)
    assert man.params == man.flops == 0


def test_redundant_channels_rounds_halves_up() -> None:
    assert [redundant_channels(r, 8) for r in (0.0, 0.0625, 0.5, 0.99, 1.0)] == [0, 1, 4, 8, 8]
    assert redundant_channels(1 - 64 / 128, 128) == 64


def test_bad_input_is_refused() -> None:
    layers, total = _chain()
    groups, _ = build_groups(layers)
    with pytest.raises(InvalidInputError, match="one redundancy per group"):
        removable(groups, [0.1], params_total=total)
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        removable(groups, [0.1, 1.5, 0.0, 0.0], params_total=total)
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        removable(groups, [0.1, 0.1, 0.0, 0.0], params_total=-1)
