"""Compensation (graphs.compensated): folds for every method, the sidecar, exactness through
the fold, mean folds of data-free statistics, the graph methods' features from statistics."""

from __future__ import annotations

import numpy as np
import pytest

from graphs import InvalidInputError
from graphs.compensated import plan_sidecar, save_plan, sidecar_path
from graphs.fold import decode_sidecar, fold_weight, sidecar_sha256
from graphs.plan import PruningPlan
from tests.graphs.chain import tiny_manifest
from tests.graphs.stats_case import plan_tiny, planted_maps, planted_stats
from tests.graphs.test_functional import gram


@pytest.mark.parametrize("method", ["mrp", "srr", "hsc", "l1", "fpgm", "random"])
def test_every_method_gets_folds_for_every_consumer(method: str) -> None:
    plan = plan_tiny(method, stats=planted_stats())
    assert plan.compensation is not None and plan.achieved["flops"] >= 0.25
    data = plan_sidecar(plan)
    assert plan.compensation.sidecar_sha256 == sidecar_sha256(data)
    arrays = decode_sidecar(data)
    consumers = {0: ("b", 1), 1: ("fc", 4)}
    pruned = [g for g in plan.groups if g.remove]
    assert pruned and len(plan.compensation.folds) == len(pruned)
    for f in plan.compensation.folds:
        g = next(g for g in plan.groups if g.id == f.group)
        assert (f.consumer, f.per_channel) == consumers[g.id]
        assert f.removed == g.remove and arrays[f.matrix].shape == (len(f.removed), len(f.kept))
        assert arrays[f.shift].shape == (len(f.removed),)
        assert g.predicted_error == pytest.approx(f.predicted_error, abs=1e-8)
    assert PruningPlan.model_validate_json(plan.to_json()) == plan
    again = plan_tiny(method, stats=planted_stats())
    assert again.to_json() == plan.to_json() and plan_sidecar(again) == data


def test_the_folded_consumer_keeps_its_output_where_channels_are_combinations() -> None:
    _man, layers = tiny_manifest()
    plan = plan_tiny("mrp", stats=planted_stats(), allocation="functional")
    group0 = next(g for g in plan.groups if g.id == 0)
    assert 0 < len(group0.remove) <= 3
    assert group0.predicted_error is not None and group0.predicted_error < 1e-9
    fold = next(f for f in plan.compensation.folds if f.group == 0)  # type: ignore[union-attr]
    arrays = decode_sidecar(plan_sidecar(plan))
    w = next(layer for layer in layers if layer.name == "b").weight
    w2, b2 = fold_weight(w, None, kept=fold.kept, removed=fold.removed,
                         matrix=arrays[fold.matrix], shift=arrays[fold.shift])  # fmt: skip
    x = planted_maps()
    pruned = x.copy()
    pruned[:, fold.removed] = 0.0

    def conv(inp: np.ndarray, wt: np.ndarray) -> np.ndarray:  # valid 3×3 on 4×4 → 2×2
        return np.stack([
            np.einsum("nchw,ochw->no", inp[:, :, i : i + 3, j : j + 3], wt)
            for i in range(2) for j in range(2)
        ], axis=-1)  # fmt: skip

    y = conv(x, w)
    np.testing.assert_allclose(conv(pruned, w2) + b2[None, :, None], y, atol=1e-5 * np.abs(y).max())


def test_save_plan_writes_the_sidecar_next_to_it(tmp_path: object) -> None:
    from pathlib import Path

    plan = plan_tiny("fpgm", stats=planted_stats())
    path = Path(str(tmp_path)) / "plan.json"
    side = save_plan(plan, path)
    assert side == sidecar_path(path) and side.name == "plan.fold.safetensors"
    assert side.read_bytes() == plan_sidecar(plan)
    loaded = PruningPlan.model_validate_json(path.read_text())
    with pytest.raises(InvalidInputError, match="not in memory"):
        plan_sidecar(loaded)


def test_data_free_statistics_give_mean_folds() -> None:
    from graphs.datafree import moments_gram, rectified_moments

    rng = np.random.default_rng(2)
    gamma = rng.uniform(0.5, 2.0, size=8)
    gamma[3] = 0.0  # a constant channel: exactly redundant
    mean, var = rectified_moments(gamma, rng.normal(size=8), activation="relu")
    mean_fc, var_fc = rectified_moments(np.ones(24), np.zeros(24), activation="relu")
    stats = {"b": moments_gram(mean, var, rows=64), "fc": moments_gram(mean_fc, var_fc, rows=16)}
    plan = plan_tiny("mrp", stats=stats, allocation="functional")
    assert plan.compensation is not None
    assert {f.kind for f in plan.compensation.folds} == {"mean"}
    g0 = next(g for g in plan.groups if g.id == 0)
    assert 3 in g0.remove and g0.functional_redundancy == pytest.approx(1 / 8)
    arrays = decode_sidecar(plan_sidecar(plan))
    f0 = next(f for f in plan.compensation.folds if f.group == 0)
    np.testing.assert_allclose(arrays[f0.shift], mean[f0.removed])


def test_stat_features_give_the_graph_methods_pearson_correlations() -> None:
    from graphs.compensated import group_consumers, stat_features
    from graphs.features import activation_vectors
    from graphs.similarity import unit_rows

    man, layers = tiny_manifest()
    stats = planted_stats()
    x = planted_maps().transpose(0, 2, 3, 1).reshape(-1, 8)
    x[:, 2] = 1.5  # a constant channel at b's input is a dead vector
    stats["b"] = gram(x)
    spec = group_consumers(layers, man, stats).consumers[0]
    U, norms = unit_rows(activation_vectors(stat_features(spec)))
    live = [i for i in range(8) if i != 2]
    assert norms[2] == 0 and np.all(norms[live] > 0)
    pearson = np.corrcoef(x[:, live].T)
    np.testing.assert_allclose(U[live] @ U[live].T, pearson, atol=1e-8)
