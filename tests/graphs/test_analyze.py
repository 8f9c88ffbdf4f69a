"""analyze(): grouping, determinism, the report model and its summary."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graphs import AnalysisOptions, InvalidInputError, LayerWeights, analyze, build_groups
from graphs.options import layer_seed
from graphs.report import CheckpointInfo, Report
from tests.graphs.planted import planted_layer, random_layer

INFO = CheckpointInfo(sha256="0" * 64, format="pytorch", size_bytes=1, n_tensors=1, n_params=1)


def _conv(name: str, X: np.ndarray, k: int = 3, groups: int = 1) -> LayerWeights:
    n = X.shape[0]
    return LayerWeights(
        name=name, kind="conv2d", weight=X.reshape(n, -1, k, k), groups=groups, bias=None
    )


def _layers() -> list[LayerWeights]:
    planted, _ = planted_layer(8, 4, 16 * 9, seed=0)
    return [
        _conv("stem", random_layer(16, 27, seed=1)),
        _conv("block.dw", random_layer(16, 9, seed=2), groups=16),  # depthwise, 16 channels
        _conv("block.pw", planted),
        LayerWeights(name="fc", kind="linear", weight=random_layer(10, 32, seed=3)),
    ]


def test_depthwise_is_scored_with_its_producer() -> None:
    groups, skipped = build_groups(_layers())
    assert [g.name for g in groups] == ["stem", "block.pw", "fc"]
    assert [m.name for m in groups[0].members] == ["stem", "block.dw"]
    assert groups[0].coupling == "inferred" and groups[1].coupling == "unknown"
    assert groups[0].vectors().shape == (16, 27 + 9)
    assert not skipped


def test_orphan_depthwise_is_skipped_with_reason() -> None:
    layers = [_conv("dw", random_layer(8, 9, seed=0), groups=8)]
    groups, skipped = build_groups(layers)
    assert not groups
    assert skipped[0].name == "dw" and "depthwise" in skipped[0].reason


def test_report_is_byte_identical_and_seeded() -> None:
    a = analyze(_layers(), checkpoint=INFO, seed=7).to_json()
    b = analyze(_layers(), checkpoint=INFO, seed=7).to_json()
    assert a == b
    data = json.loads(a)
    assert list(data) == [
        "schema_version", "checkpoint", "methods", "parameters", "seed", "layers", "skipped",
        "summary",
    ]  # fmt: skip
    assert Report.model_validate_json(a).to_json() == a  # round trip


def test_group_results_do_not_depend_on_other_groups() -> None:
    full = analyze(_layers(), checkpoint=INFO, methods=["mrp", "hsc"], seed=1)
    alone = analyze(_layers()[2:3], checkpoint=INFO, methods=["mrp", "hsc"], seed=1)
    assert full.layers[1].methods == alone.layers[0].methods
    assert layer_seed(1, "a") != layer_seed(1, "b") and layer_seed(1, "a") == layer_seed(1, "a")


def test_planted_layer_is_the_most_redundant() -> None:
    report = analyze(_layers(), checkpoint=INFO, methods=["mrp", "srr", "hsc", "l1"])
    pw = report.layers[1]
    for m in ("mrp", "srr", "hsc"):
        assert pw.methods[m].redundancy == pytest.approx(0.75, abs=0.05)
        assert report.summary.methods[m].most_redundant[0] == "block.pw"
        expected = sum(layer.params * (layer.methods[m].redundancy or 0) for layer in report.layers)
        total = sum(layer.params for layer in report.layers)
        got = report.summary.methods[m].redundancy_params_weighted
        assert got == pytest.approx(expected / total, abs=1e-6)
    assert report.summary.methods["l1"].redundancy_params_weighted is None
    assert report.layers[0].methods["l1"].redundancy is None


def test_unknown_method_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="unknown"):
        analyze(_layers(), checkpoint=INFO, methods=["mrp", "magic"])


def test_options_are_recorded() -> None:
    r = analyze(_layers()[:1], checkpoint=INFO, methods=["hsc"], options=AnalysisOptions(k=3))
    assert r.parameters == {"hsc": {"alpha": 0.05, "min_explained": 0.5, "k": 3, "n_rounds": 3}}


def test_depthwise_with_a_skipped_named_producer_is_skipped() -> None:
    stem = _conv("stem", random_layer(8, 27, seed=0))
    dw = LayerWeights(
        name="dw",
        kind="conv2d",
        weight=random_layer(8, 9, seed=1).reshape(8, 1, 3, 3),
        groups=8,
        producer="a",  # 'a' (8 channels) was skipped by the reader, e.g. for NaN weights
    )
    groups, skipped = build_groups([stem, dw])
    assert [m.name for g in groups for m in g.members] == ["stem"]
    assert skipped[0].name == "dw" and "'a'" in skipped[0].reason
    named = LayerWeights(name="dw", kind="conv2d", weight=dw.weight, groups=8, producer="stem")
    groups, skipped = build_groups([stem, named])
    assert [m.name for m in groups[0].members] == ["stem", "dw"] and not skipped


def test_depthwise_whose_reader_found_no_producer_is_skipped() -> None:
    layers = [
        _conv("blk.conv_b", random_layer(8, 27, seed=0)),
        LayerWeights(
            name="blk.conv_dw",
            kind="conv2d",
            weight=random_layer(8, 9, seed=1).reshape(8, 1, 3, 3),
            groups=8,
            groups_source="inferred",
        ),
    ]
    groups, skipped = build_groups(layers)
    assert [m.name for g in groups for m in g.members] == ["blk.conv_b"]
    assert skipped[0].name == "blk.conv_dw" and "could not be determined" in skipped[0].reason
