"""Compensated plans: folds for every method, sidecar, exactness through the fold, allocation."""

from __future__ import annotations

import numpy as np
import pytest

from graphs import InvalidInputError
from graphs.compensated import plan_sidecar, save_plan, sidecar_path
from graphs.fold import decode_sidecar, fold_weight, sidecar_sha256
from graphs.functional import error_curve
from graphs.plan import PruningPlan, Target
from graphs.planner import plan_layers
from tests.graphs.test_functional import gram
from tests.graphs.test_planner import _tiny_manifest

REMOVABLE = [1, 4, 6]  # 3 of a's 8 channels are exact combinations of 5 others at b's input
# (so b's input has rank 5: any 3 channels whose rest spans it are removable exactly)


def _maps(seed: int = 0) -> np.ndarray:
    """b's input: 40 samples of a's 8 channels on 4×4 (after BN/ReLU), 3 channels planted."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 8, 4, 4)) + 0.3
    others = [i for i in range(8) if i not in REMOVABLE]
    mix = rng.normal(size=(3, 5))
    x[:, REMOVABLE] = np.einsum("rk,nkhw->nrhw", mix, x[:, others]) + 0.2
    return x


def _stats(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    x = _maps(seed)
    fc_in = rng.normal(size=(40, 6, 4)).reshape(40, 24)
    return {"b": gram(x.transpose(0, 2, 3, 1).reshape(-1, 8)), "fc": gram(fc_in)}


def _plan(method: str, **kw: object) -> PruningPlan:
    man, layers = _tiny_manifest()
    return plan_layers(
        layers, method=method, target=Target(flops=0.25), params_total=man.params_total,  # type: ignore[arg-type]
        manifest=man, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.mark.parametrize("method", ["mrp", "srr", "hsc", "l1", "fpgm", "random"])
def test_every_method_gets_folds_for_every_consumer(method: str) -> None:
    plan = _plan(method, stats=_stats())
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
    again = _plan(method, stats=_stats())
    assert again.to_json() == plan.to_json() and plan_sidecar(again) == data


def test_no_compensation_keeps_the_choice_and_drops_the_folds() -> None:
    with_folds = _plan("l1", stats=_stats())
    without = _plan("l1", stats=_stats(), compensation=False)
    assert without.compensation is None and "compensation" not in without.to_json()
    assert [g.remove for g in without.groups] == [g.remove for g in with_folds.groups]
    assert plan_sidecar(without) == b""


def test_the_folded_consumer_keeps_its_output_where_channels_are_combinations() -> None:
    _man, layers = _tiny_manifest()
    plan = _plan("mrp", stats=_stats(), allocation="functional")
    group0 = next(g for g in plan.groups if g.id == 0)
    assert 0 < len(group0.remove) <= 3
    assert group0.predicted_error is not None and group0.predicted_error < 1e-9
    fold = next(f for f in plan.compensation.folds if f.group == 0)  # type: ignore[union-attr]
    arrays = decode_sidecar(plan_sidecar(plan))
    w = next(layer for layer in layers if layer.name == "b").weight
    w2, b2 = fold_weight(w, None, kept=fold.kept, removed=fold.removed,
                         matrix=arrays[fold.matrix], shift=arrays[fold.shift])  # fmt: skip
    x = _maps()
    pruned = x.copy()
    pruned[:, fold.removed] = 0.0

    def conv(inp: np.ndarray, wt: np.ndarray) -> np.ndarray:  # valid 3×3 on 4×4 → 2×2
        return np.stack([
            np.einsum("nchw,ochw->no", inp[:, :, i : i + 3, j : j + 3], wt)
            for i in range(2) for j in range(2)
        ], axis=-1)  # fmt: skip

    y = conv(x, w)
    np.testing.assert_allclose(conv(pruned, w2) + b2[None, :, None], y, atol=1e-5 * np.abs(y).max())


@pytest.mark.parametrize("allocation", ["uniform", "functional", "marginal", "method"])
def test_allocations_meet_the_target(allocation: str) -> None:
    plan = _plan("l1", stats=_stats(), allocation=allocation)
    assert plan.achieved["flops"] >= 0.25
    assert plan.parameters["allocation"] == allocation
    fr = {g.id: g.functional_redundancy for g in plan.groups}
    assert fr[0] == pytest.approx(3 / 8) and fr[1] is not None and fr[1] <= 0.2


def test_functional_allocation_takes_the_redundant_group_first() -> None:
    plan = _plan("random", stats=_stats(), allocation="functional", seed=3)
    removed = {g.id: len(g.remove) for g in plan.groups}
    uniform_plan = _plan("random", stats=_stats(), allocation="uniform", seed=3)
    uniform = {g.id: len(g.remove) for g in uniform_plan.groups}
    assert removed[0] >= 3 and removed[0] > uniform[0]


def test_save_plan_writes_the_sidecar_next_to_it(tmp_path: object) -> None:
    from pathlib import Path

    plan = _plan("fpgm", stats=_stats())
    path = Path(str(tmp_path)) / "plan.json"
    side = save_plan(plan, path)
    assert side == sidecar_path(path) and side.name == "plan.fold.safetensors"
    assert side.read_bytes() == plan_sidecar(plan)
    loaded = PruningPlan.model_validate_json(path.read_text())
    with pytest.raises(InvalidInputError, match="not in memory"):
        plan_sidecar(loaded)


def test_bad_statistics_are_clear_errors() -> None:
    stats = _stats()
    with pytest.raises(InvalidInputError, match="must be"):
        _plan("l1", stats={**stats, "b": stats["b"][:5, :5]})
    with pytest.raises(InvalidInputError, match="no conv/linear layer"):
        _plan("l1", stats={**stats, "nope": stats["b"]})
    with pytest.raises(InvalidInputError, match="allocation"):
        _plan("l1", stats=stats, allocation="greedy")
    with pytest.raises(InvalidInputError, match="epsilon"):
        _plan("l1", stats=stats, epsilon=-1.0)
    _man, layers = _tiny_manifest()
    with pytest.raises(InvalidInputError, match="manifest"):
        plan_layers(layers, method="l1", target=Target(params=0.2), params_total=1, stats=stats)


def test_missing_consumer_statistics_are_named_in_the_rule() -> None:
    plan = _plan("l1", stats={"b": _stats()["b"]})
    assert "no statistics for fc" in plan.rule
    assert {f.consumer for f in plan.compensation.folds} <= {"b"}  # type: ignore[union-attr]


def test_mrp_with_statistics_removes_the_head_of_the_least_squares_path() -> None:
    from graphs.compensated import group_consumers

    man, layers = _tiny_manifest()
    plan = _plan("mrp", stats=_stats())
    found = group_consumers(layers, man, _stats())
    for g in plan.groups:
        if g.remove and g.id in found.consumers:
            curve = error_curve([s.data for s in found.consumers[g.id]], max_remove=len(g.remove))
            assert g.remove == sorted(int(i) for i in curve.order)


def test_data_free_statistics_give_mean_folds() -> None:
    from graphs.datafree import moments_gram, rectified_moments

    rng = np.random.default_rng(2)
    gamma = rng.uniform(0.5, 2.0, size=8)
    gamma[3] = 0.0  # a constant channel: exactly redundant
    mean, var = rectified_moments(gamma, rng.normal(size=8), activation="relu")
    mean_fc, var_fc = rectified_moments(np.ones(24), np.zeros(24), activation="relu")
    stats = {"b": moments_gram(mean, var, rows=64), "fc": moments_gram(mean_fc, var_fc, rows=16)}
    plan = _plan("mrp", stats=stats, allocation="functional")
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

    man, layers = _tiny_manifest()
    stats = _stats()
    x = _maps().transpose(0, 2, 3, 1).reshape(-1, 8)
    x[:, 2] = 1.5  # a constant channel at b's input is a dead vector
    stats["b"] = gram(x)
    spec = group_consumers(layers, man, stats).consumers[0]
    U, norms = unit_rows(activation_vectors(stat_features(spec)))
    live = [i for i in range(8) if i != 2]
    assert norms[2] == 0 and np.all(norms[live] > 0)
    pearson = np.corrcoef(x[:, live].T)
    np.testing.assert_allclose(U[live] @ U[live].T, pearson, atol=1e-8)
