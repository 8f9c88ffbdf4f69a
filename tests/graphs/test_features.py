"""Data-aware analysis: feature maps as vectors (calibrated like weights) and ci plans."""

from __future__ import annotations

import numpy as np
import pytest

from graphs import AnalysisOptions, InvalidInputError, LayerGroup, LayerWeights, analyze
from graphs.features import activation_vectors, group_features
from graphs.plan import Target
from graphs.planner import plan_layers
from graphs.report import CheckpointInfo


def _conv(name: str, n: int, d: int = 8, seed: int = 0) -> LayerWeights:
    w = np.random.default_rng(seed).standard_normal((n, d, 3, 3))
    return LayerWeights(name=name, kind="conv2d", weight=w)


def _info(layers: list[LayerWeights]) -> CheckpointInfo:
    n = sum(x.params for x in layers)
    return CheckpointInfo(sha256="0" * 64, format="pytorch", size_bytes=1, n_tensors=2, n_params=n)


def _independent(n: int, samples: int = 24, pixels: int = 49, seed: int = 0) -> np.ndarray:
    """ReLU'd maps of independent channels: (samples, n, pixels)."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.standard_normal((samples, n, pixels)) + 0.3, 0.0)


def _planted(m: int, r: int, samples: int = 24, pixels: int = 49, seed: int = 0) -> np.ndarray:
    """m independent channels, each present r times with small noise, rows shuffled."""
    rng = np.random.default_rng(seed)
    base = np.maximum(rng.standard_normal((samples, m, pixels)) + 0.3, 0.0)
    maps = np.repeat(base, r, axis=1) * rng.uniform(0.5, 2.0, size=(1, m * r, 1))
    maps = maps + 0.02 * rng.standard_normal(maps.shape)
    return maps[:, rng.permutation(m * r), :]


def test_activation_vectors_give_pearson_correlations() -> None:
    F = _independent(12, seed=1)
    F[:, 3] = 2.0 * F[:, 5] + 1.0  # perfectly correlated channel
    V = activation_vectors(F)
    A = F.transpose(1, 0, 2).reshape(12, -1)
    np.testing.assert_allclose(V @ V.T, np.cov(A, bias=True) * A.shape[1], rtol=1e-9, atol=1e-9)
    U = V / np.linalg.norm(V, axis=1, keepdims=True)
    np.testing.assert_allclose(U @ U.T, np.corrcoef(A), atol=1e-10)
    F[:, 7] = 0.5  # a constant channel carries nothing: a dead (zero) row
    assert not activation_vectors(F)[7].any()


def test_group_features_concatenate_members_once() -> None:
    a, b = _conv("a", 10), _conv("b", 10, seed=1)
    group = LayerGroup("a", (a, b), coupling="manifest")
    shared = _independent(10)
    F = group_features(group, {"a": shared, "b": shared})
    assert F.shape == (24, 10, 49)  # the same capture counts once
    F = group_features(group, {"a": shared, "b": 3.0 * _independent(10, seed=2)})
    assert F.shape == (24, 10, 98)
    np.testing.assert_allclose(np.sqrt(np.mean(F[:, :, 49:] ** 2)), 1.0)  # unit RMS members
    with pytest.raises(InvalidInputError, match="no feature maps for layer b"):
        group_features(group, {"a": shared})
    with pytest.raises(InvalidInputError, match="10 channels"):
        group_features(group, {"a": shared, "b": _independent(9)})


@pytest.mark.parametrize("method", ["mrp", "hsc", "srr"])
def test_data_aware_graphs_are_calibrated(method: str) -> None:
    """Independent channels: no redundancy; m channels r times: 1 - m/n (design §3)."""
    layers = [_conv("rand", 64), _conv("planted", 48, seed=1)]
    acts = {"rand": _independent(64, seed=3), "planted": _planted(12, 4, seed=4)}
    opts = AnalysisOptions(vectors="activations")
    report = analyze(
        layers, checkpoint=_info(layers), methods=[method], options=opts, activations=acts
    )
    red = {lay.name: lay.methods[method].redundancy for lay in report.layers}
    assert red["rand"] is not None and red["rand"] <= 0.05, red
    assert red["planted"] is not None and abs(red["planted"] - (1 - 12 / 48)) <= 0.05, red
    assert report.parameters[method]["vectors"] == "activations"
    weights = analyze(layers, checkpoint=_info(layers), methods=[method])  # weights differ
    assert "vectors" not in weights.parameters[method]


def test_missing_activations_are_refused_before_work() -> None:
    layers = [_conv("a", 16)]
    with pytest.raises(InvalidInputError, match="need feature maps"):
        analyze(layers, checkpoint=_info(layers), methods=["ci"])
    with pytest.raises(InvalidInputError, match="need feature maps"):
        plan_layers(layers, method="ci", target=Target(params=0.3), params_total=100)


def _chain() -> tuple[list[LayerWeights], dict[str, np.ndarray]]:
    layers = [_conv("stem", 16, d=3), _conv("a", 32, d=16, seed=1), _conv("b", 32, d=32, seed=2)]
    layers.append(LayerWeights("fc", "linear", np.random.default_rng(3).standard_normal((10, 32))))
    rng = np.random.default_rng(5)
    a = _independent(32, seed=6)
    mix = rng.dirichlet(np.ones(4), size=12)  # channels 20..31: convex mixes of channels 0..3
    a[:, 20:] = np.einsum("kj,sjp->skp", mix, a[:, :4])
    acts = {"stem": _independent(16, seed=7), "a": a, "b": _independent(32, seed=8)}
    acts["fc"] = _independent(10, samples=1, pixels=24, seed=9)
    return layers, acts


def test_ci_plan_removes_dependent_channels_first_and_reaches_the_target() -> None:
    layers, acts = _chain()
    total = sum(x.params for x in layers)
    plan = plan_layers(
        layers, method="ci", target=Target(params=0.2), params_total=total, activations=acts
    )
    by = {g.name: g for g in plan.groups}
    assert plan.achieved["params"] >= 0.2 and "alpha" in plan.rule
    dependent = set(range(4)) | set(range(20, 32))  # 16 channels spanning 4 dimensions
    assert by["a"].remove and set(by["a"].remove) <= dependent
    assert len(by["a"].remove) > len(by["b"].remove)  # the adaptive per-layer count
    assert by["stem"].remove == [] and by["fc"].remove == []  # stem and output kept
    again = plan_layers(
        layers, method="ci", target=Target(params=0.2), params_total=total, activations=acts
    )
    assert again.to_json() == plan.to_json()
    report = analyze(layers, checkpoint=_info(layers), methods=["ci", "l1"], activations=acts)
    ci = report.layers[1].methods["ci"]
    assert ci.method == "ci" and ci.n_samples == 24 and len(ci.ci) == 32
