"""Recurrent layers as graphs of hidden units: layout, calibration (design §3), plans."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from graphs import analyze
from graphs.grouping import build_groups
from graphs.layers import LayerWeights
from graphs.manifest import ChannelGroup, Manifest, ParamAxis
from graphs.plan import Target
from graphs.planner import plan_layers
from graphs.recurrent import GATES, NO_MAPS_REASON, Cell, gates_of, parse
from graphs.report import CheckpointInfo
from graphs.strategies import GRAPH_METHODS
from tests.graphs.planted import same_partition

INFO = CheckpointInfo(sha256="0" * 64, format="pytorch", size_bytes=1, n_tensors=1, n_params=1)


def _labels(result: object) -> np.ndarray:
    for field in ("communities", "components", "clusters"):
        if hasattr(result, field):
            return np.asarray(getattr(result, field))
    raise AssertionError(f"no labels in {result}")


def recurrent_weights(
    cell: Cell,
    hidden: int,
    inputs: int,
    *,
    seed: int,
    protos: int | None = None,
    noise: float = 0.03,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(weight_ih (G·H, in), weight_hh (G·H, H), truth (H,))`` in PyTorch's gate layout.

    With ``protos = m``, unit j copies prototype ``truth[j]`` in every gate: its rows of
    weight_ih and weight_hh, and its column of weight_hh (entry (g, j, k) depends only on the
    prototypes of j and k), plus small noise; the units are shuffled. Without it, i.i.d. Gaussian
    weights and ``truth = arange(H)``.
    """
    rng = np.random.default_rng(seed)
    g = GATES[cell]
    if protos is None:
        ih = rng.standard_normal((g * hidden, inputs))
        return ih, rng.standard_normal((g * hidden, hidden)), np.arange(hidden)
    truth = rng.permutation(np.repeat(np.arange(protos), hidden // protos))
    p_ih = rng.standard_normal((g, protos, inputs))
    p_hh = rng.standard_normal((g, protos, protos))
    ih = p_ih[:, truth].reshape(g * hidden, inputs)
    hh = p_hh[:, truth][:, :, truth].reshape(g * hidden, hidden)
    ih = ih + noise * rng.standard_normal(ih.shape)
    hh = hh + noise * rng.standard_normal(hh.shape)
    return ih, hh, truth


def _layers(
    module: str, suffix: str, ih: np.ndarray, hh: np.ndarray, bias: bool = True
) -> list[LayerWeights]:
    rows = ih.shape[0]
    b = np.linspace(-1, 1, rows) if bias else None
    pre = f"{module}." if module else ""
    return [
        LayerWeights(f"{pre}weight_ih{suffix}", "linear", ih, bias=b),
        LayerWeights(f"{pre}weight_hh{suffix}", "linear", hh, bias=b),
    ]


def test_names_and_gates_are_recognised() -> None:
    assert parse("rnn.weight_ih_l0") == ("rnn", "weight", "ih", "_l0")
    assert parse("a.b.bias_hh_l2_reverse") == ("a.b", "bias", "hh", "_l2_reverse")
    assert parse("weight_hh") == ("", "weight", "hh", "")
    assert parse("lstm.weight_hr_l0") == ("lstm", "weight", "hr", "_l0")
    assert parse("fc.weight") is None
    assert gates_of((40, 7), (40, 10)) == ("lstm", 10)
    assert gates_of((30, 7), (30, 10)) == ("gru", 10)
    assert gates_of((10, 7), (10, 10)) == ("rnn", 10)
    assert isinstance(gates_of((20, 7), (20, 10)), str)  # 2 gates: no such cell
    assert isinstance(gates_of((40, 7), (30, 10)), str)  # ih and hh of different layers


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_a_unit_is_its_gate_rows_and_its_recurrent_column(cell: Cell) -> None:
    ih, hh, _ = recurrent_weights(cell, 6, 5, seed=1)
    ih, hh = ih * 3.0, hh * 0.5  # parts of different scales
    groups, skipped = build_groups(_layers("rnn", "_l0", ih, hh))
    assert not skipped and len(groups) == 1
    group = groups[0]
    assert (group.unit, group.n_filters, group.name) == ("hidden", 6, "rnn.weight_ih_l0")
    g = GATES[cell]
    V = group.vectors()
    rms = [np.sqrt(np.mean(a * a)) for a in (ih, hh, hh)]
    for j in range(6):  # the slow reference: gate by gate
        rows_ih = np.concatenate([ih[k * 6 + j] for k in range(g)]) / rms[0]
        rows_hh = np.concatenate([hh[k * 6 + j] for k in range(g)]) / rms[1]
        np.testing.assert_allclose(V[j], np.concatenate([rows_ih, rows_hh, hh[:, j] / rms[2]]))
    assert group.fan_in == g * 5 + 2 * g * 6
    assert group.params == ih.size + hh.size + 2 * ih.shape[0]  # weight_hh counted once


def test_layers_and_directions_are_groups_of_their_own() -> None:
    rng = np.random.default_rng(0)
    layers: list[LayerWeights] = []
    for suffix, inputs in [("_l0", 7), ("_l0_reverse", 7), ("_l1", 16), ("_l1_reverse", 16)]:
        layers += _layers(
            "enc.gru", suffix, rng.standard_normal((24, inputs)), rng.standard_normal((24, 8))
        )
    layers += _layers("vad.cell", "", rng.standard_normal((40, 3)), rng.standard_normal((40, 10)))
    layers.append(LayerWeights("head", "linear", rng.standard_normal((2, 10))))
    groups, _ = build_groups(layers)
    assert [(g.name, g.unit, g.n_filters) for g in groups] == [
        ("enc.gru.weight_ih_l0", "hidden", 8),
        ("enc.gru.weight_ih_l0_reverse", "hidden", 8),
        ("enc.gru.weight_ih_l1", "hidden", 8),
        ("enc.gru.weight_ih_l1_reverse", "hidden", 8),
        ("vad.cell.weight_ih", "hidden", 10),
        ("head", "channels", 2),
    ]
    report = analyze(layers, checkpoint=INFO, methods=["mrp"])
    assert {r.kind for r in report.layers[:5]} == {"recurrent"}
    assert report.layers[0].members == ["enc.gru.weight_ih_l0", "enc.gru.weight_hh_l0"]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("hidden,inputs", [(16, 24), (64, 40), (128, 256)])
def test_random_recurrent_weights_have_no_redundancy(cell: Cell, hidden: int, inputs: int) -> None:
    for seed in (0, 1):
        ih, hh, _ = recurrent_weights(cell, hidden, inputs, seed=seed)
        report = analyze(
            _layers("rnn", "_l0", ih, hh), checkpoint=INFO, methods=GRAPH_METHODS, seed=seed
        )
        for method in GRAPH_METHODS:
            red = report.layers[0].methods[method].redundancy
            assert red is not None and red <= 0.05, f"{cell} {method} {hidden}x{inputs}: {red}"


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("m,r,inputs", [(8, 4, 24), (20, 3, 64), (16, 8, 40)])
def test_planted_duplicate_units_are_found(cell: Cell, m: int, r: int, inputs: int) -> None:
    for seed in (0, 1):
        ih, hh, truth = recurrent_weights(cell, m * r, inputs, seed=seed, protos=m)
        report = analyze(
            _layers("rnn", "_l0", ih, hh), checkpoint=INFO, methods=GRAPH_METHODS, seed=seed
        )
        for method in GRAPH_METHODS:
            result = report.layers[0].methods[method]
            assert result.redundancy == pytest.approx(1 - m / (m * r), abs=0.05), (cell, method)
            assert same_partition(_labels(result), truth), f"{cell} {method}: copies split"


@pytest.mark.parametrize("method", GRAPH_METHODS)
def test_permuting_units_changes_only_labels(method: str) -> None:
    ih, hh, _ = recurrent_weights("lstm", 24, 20, seed=4, protos=6)
    ih0, _, _ = recurrent_weights("lstm", 16, 20, seed=5)
    # a mix: 24 planted units and 16 distinct ones in one layer of 40
    hidden, g = 40, 4
    IH = np.concatenate(
        [np.concatenate([ih[k * 24 : (k + 1) * 24], ih0[k * 16 : (k + 1) * 16]]) for k in range(g)]
    )
    HH = np.zeros((g * hidden, hidden))
    rng = np.random.default_rng(6)
    for k in range(g):
        HH[k * hidden : (k + 1) * hidden] = rng.standard_normal((hidden, hidden))
        HH[k * hidden : k * hidden + 24, :24] = hh[k * 24 : (k + 1) * 24]
    perm = np.random.default_rng(7).permutation(hidden)
    rows = np.concatenate([k * hidden + perm for k in range(g)])
    base = analyze(_layers("rnn", "_l0", IH, HH), checkpoint=INFO, methods=[method])
    moved = analyze(
        _layers("rnn", "_l0", IH[rows], HH[rows][:, perm]), checkpoint=INFO, methods=[method]
    )
    a, b = base.layers[0].methods[method], moved.layers[0].methods[method]
    assert a.redundancy == pytest.approx(b.redundancy)
    assert a.redundancy is not None and a.redundancy > 0.2  # structure to permute
    assert same_partition(_labels(a)[perm], _labels(b))


def _bidirectional(seed: int) -> tuple[list[LayerWeights], Manifest, list[np.ndarray]]:
    """A bidirectional LSTM (hidden 12, 3 prototypes per direction) and a linear head (5, 24),
    with the manifest clients.build_manifest would write: one group of 12 units."""
    layers: list[LayerWeights] = []
    truths = []
    for k, suffix in enumerate(["_l0", "_l0_reverse"]):
        ih, hh, truth = recurrent_weights("lstm", 12, 10, seed=seed + k, protos=3)
        layers += _layers("rnn", suffix, ih, hh)
        truths.append(truth)
    head = np.random.default_rng(seed).standard_normal((5, 24))
    layers.append(LayerWeights("fc", "linear", head, bias=np.zeros(5)))
    params: list[ParamAxis] = []
    shapes: dict[str, list[int]] = {}
    for suffix in ["_l0", "_l0_reverse"]:
        for mat, cols in [("ih", 10), ("hh", 12)]:
            shapes[f"rnn.weight_{mat}{suffix}"] = [48, cols]
            shapes[f"rnn.bias_{mat}{suffix}"] = [48]
            params.append(ParamAxis(param=f"rnn.weight_{mat}{suffix}", axis=0, blocks=4))
            params.append(ParamAxis(param=f"rnn.bias_{mat}{suffix}", axis=0, blocks=4))
        params.append(ParamAxis(param=f"rnn.weight_hh{suffix}", axis=1))
    params.append(ParamAxis(param="fc.weight", axis=1, blocks=2))
    shapes |= {"fc.weight": [5, 24], "fc.bias": [5]}
    manifest = Manifest(
        input_shapes=[[1, 7, 10]],
        params_total=sum(int(np.prod(s)) for s in shapes.values()),
        macs_total=0,
        param_shapes=shapes,
        layers=[],
        groups=[
            ChannelGroup(id=0, channels=12, producers=["rnn"], params=params, unit="hidden"),
            ChannelGroup(
                id=1,
                channels=5,
                producers=["fc"],
                params=[ParamAxis(param="fc.weight", axis=0), ParamAxis(param="fc.bias", axis=0)],
                prunable=False,
                reason="classifier",
            ),
        ],
        costs=[],
    )
    return layers, manifest, truths


def test_manifest_couples_directions_and_consumer_columns() -> None:
    layers, manifest, _ = _bidirectional(3)
    groups, skipped = build_groups(layers, manifest)
    assert not skipped
    rnn = groups[0]
    assert (rnn.unit, rnn.n_filters, rnn.group_id, rnn.coupling) == ("hidden", 12, 0, "manifest")
    assert [m.name for m in rnn.members][-1] == "fc"
    fc = layers[-1].weight
    V = rnn.vectors()
    rms = np.sqrt(np.mean(fc * fc))
    tail = 2 * 5  # fc's columns of the unit in both directions' blocks
    for j in range(12):
        np.testing.assert_allclose(V[j, -tail:], np.concatenate([fc[:, j], fc[:, 12 + j]]) / rms)


@pytest.mark.parametrize("method", ["mrp", "srr", "hsc", "l1", "fpgm", "random"])
def test_plans_remove_whole_units_with_exact_shapes(method: str) -> None:
    layers, manifest, _ = _bidirectional(8)
    plan = plan_layers(
        layers, method=method, target=Target(params=0.3), params_total=manifest.params_total,  # type: ignore[arg-type]
        manifest=manifest,
    )  # fmt: skip
    gp = next(g for g in plan.groups if g.unit == "hidden")
    assert gp.remove and gp.channels_after == 12 - len(gp.remove)
    k = len(gp.remove)
    shapes = plan.expected_shapes
    assert shapes["rnn.weight_ih_l0"] == [4 * (12 - k), 10]
    assert shapes["rnn.weight_hh_l0_reverse"] == [4 * (12 - k), 12 - k]
    assert shapes["rnn.bias_hh_l0"] == [4 * (12 - k)]
    assert shapes["fc.weight"] == [5, 2 * (12 - k)]
    by_param = {(pa.param, pa.axis): pa for pa in gp.params}
    assert by_param[("rnn.weight_ih_l0", 0)].blocks == 4
    assert by_param[("rnn.weight_hh_l0", 1)].blocks == 1
    assert by_param[("fc.weight", 1)].blocks == 2
    assert ("rnn.bias_ih_l0_reverse", 0) in by_param
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert plan.params_after == total
    again = plan_layers(
        layers, method=method, target=Target(params=0.3), params_total=manifest.params_total,  # type: ignore[arg-type]
        manifest=manifest,
    )  # fmt: skip
    assert again.to_json() == plan.to_json()


def test_without_a_manifest_units_are_analysed_but_kept_in_plans() -> None:
    rng = np.random.default_rng(2)
    ih, hh, _ = recurrent_weights("gru", 16, 12, seed=2, protos=4)
    layers = [
        LayerWeights("conv", "conv1d", rng.standard_normal((12, 3, 3))),
        *_layers("gru", "_l0", ih, hh),
        LayerWeights("fc", "linear", rng.standard_normal((4, 16))),
    ]
    total = sum(x.params for x in layers)
    plan = plan_layers(layers, method="mrp", target=Target(params=0.2), params_total=total)
    gp = next(g for g in plan.groups if g.unit == "hidden")
    assert gp.remove == [] and gp.channels_after == 16
    assert "only with a manifest" in gp.rationale
    assert plan.params_before == total
    report = analyze(layers, checkpoint=INFO, methods=["mrp"])
    assert report.layers[1].methods["mrp"].redundancy == pytest.approx(0.75, abs=0.05)


def test_a_group_rebuilt_from_copies_counts_weight_hh_once() -> None:
    """Tasks (service.jobs.executors.local) rebuild a group's members as new objects:
    weight_hh's two parts are then two objects of one name, still one parameter."""
    ih, hh, _ = recurrent_weights("gru", 8, 5, seed=0)
    (group,), _ = build_groups(_layers("rnn", "_l0", ih, hh))
    again = dataclasses.replace(group, members=tuple(dataclasses.replace(m) for m in group.members))
    assert again.params == group.params == ih.size + hh.size + 2 * ih.shape[0]
    assert [m.name for m in again.producers] == ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]
    np.testing.assert_array_equal(again.vectors(), group.vectors())


def test_with_feature_maps_units_are_skipped_with_the_reason_and_kept_in_plans() -> None:
    """Captured activations cover conv/linear channels only: ci and data-aware graphs analyse
    those, and the recurrent units are listed as skipped (not an error for the whole model)."""
    rng = np.random.default_rng(3)
    ih, hh, _ = recurrent_weights("lstm", 8, 12, seed=3, protos=2)
    layers = [
        LayerWeights("conv", "conv1d", rng.standard_normal((12, 3, 3))),
        *_layers("rnn", "_l0", ih, hh),
        LayerWeights("fc", "linear", rng.standard_normal((4, 8))),
    ]
    acts = {"conv": rng.standard_normal((6, 12, 20)), "fc": rng.standard_normal((6, 4, 1))}
    report = analyze(layers, checkpoint=INFO, methods=["ci", "mrp"], activations=acts)
    assert [r.name for r in report.layers] == ["conv", "fc"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["rnn.weight_ih_l0"] == reasons["rnn.weight_hh_l0"] == NO_MAPS_REASON
    layers, manifest, _ = _bidirectional(1)
    plan = plan_layers(
        layers, method="mrp", target=Target(params=0.2), params_total=manifest.params_total,
        manifest=manifest, activations={"fc": rng.standard_normal((6, 5, 1))},
    )  # fmt: skip
    (gp,) = [g for g in plan.groups if g.unit == "hidden"]
    assert gp.remove == [] and NO_MAPS_REASON in gp.rationale
