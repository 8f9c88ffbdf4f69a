"""Cross-fitted error curves (graphs.crossfit): invariants and a slow explicit reference."""

from __future__ import annotations

import numpy as np
import pytest

from graphs import InvalidInputError
from graphs.compensated import group_consumers
from graphs.consumers import Consumer, ConsumerStats
from graphs.crossfit import crossfit_curve, crossfit_curves, direction_errors, split_stats
from graphs.functional import error_curve, least_squares_fold
from graphs.options import DEFAULT_RIDGE
from graphs.plan import Target
from graphs.planner import plan_layers
from tests.graphs.chain import tiny_manifest
from tests.graphs.stats_case import planted_maps, planted_stats
from tests.graphs.test_functional import gram


def halves(
    seed: int = 0, c: int = 10, weight: bool = True, rows: tuple[int, int] = (60, 45)
) -> tuple[np.ndarray, ...]:
    """Rows of two halves (different sizes, shifted means) of the same 5-factor model (more rows
    than channels: real least-squares folds, not mean folds)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(5, c))
    na, nb = rows
    xa = rng.normal(size=(na, 5)) @ mix + 0.4 * rng.normal(size=(na, c)) + 1.0
    xb = rng.normal(size=(nb, 5)) @ mix + 0.4 * rng.normal(size=(nb, c)) + 1.3
    w = rng.normal(size=(4, c, 3)) if weight else None
    return xa, xb, w  # type: ignore[return-value]


def consumers(xa: np.ndarray, xb: np.ndarray, w: np.ndarray | None) -> tuple[Consumer, ...]:
    a = Consumer("x", ConsumerStats(gram(xa)), w)
    b = Consumer("x", ConsumerStats(gram(xb)), w)
    return a, b, Consumer("x", ConsumerStats(gram(xa) + gram(xb)), w)


def explicit(fit: Consumer, rows: np.ndarray, pooled: Consumer, order: np.ndarray) -> list[float]:
    """The fold of ``fit`` for each prefix of ``order``, its residual on ``rows``, weighted by the
    pooled metric: the definition, one prefix at a time."""
    c, p = rows.shape[1], pooled.prepared
    out = [0.0]
    for k in range(1, order.size + 1):
        r = order[:k]
        kept = np.setdiff1d(np.arange(c), r)
        B, b, _ = least_squares_fold(fit, kept.tolist(), r.tolist())
        res = (rows[:, r] - rows[:, kept] @ B.T - b) / p.sd[r]
        out.append(float(np.sum(p.metric[np.ix_(r, r)] * (res.T @ res / rows.shape[0]))))
    return out


@pytest.mark.parametrize("weight", [True, False])
def test_matches_the_explicit_fold_and_residual(weight: bool) -> None:
    xa, xb, w = halves(weight=weight)
    a, b, both = consumers(xa, xb, w)
    order = error_curve([both]).order
    fast = direction_errors(a, b, both.prepared, order, ridge=DEFAULT_RIDGE)
    np.testing.assert_allclose(fast, explicit(a, xb, both, order), rtol=1e-8, atol=1e-12)
    curve = crossfit_curve([a], [b])
    mean = (fast + direction_errors(b, a, both.prepared, order, ridge=DEFAULT_RIDGE)) / 2
    np.testing.assert_allclose(curve.errors, np.maximum.accumulate(np.maximum(mean, 0)))
    np.testing.assert_array_equal(curve.order, order)


def test_a_long_path_rebuilds_and_still_matches() -> None:
    xa, xb, w = halves(seed=3, c=70, rows=(300, 200))
    a, b, both = consumers(xa, xb, w)
    assert a.prepared.regress and b.prepared.regress  # real folds, not mean folds
    order = error_curve([both], max_remove=60).order
    fast = direction_errors(a, b, both.prepared, order, ridge=DEFAULT_RIDGE)
    np.testing.assert_allclose(fast, explicit(a, xb, both, order), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("block", [1, 2, 7, 32, 1000])
def test_every_block_size_gives_the_same_exact_errors(block: int) -> None:
    """Blocks of removals (matrix products) give the definition's error after every channel,
    across rebuilds, whatever the block."""
    xa, xb, w = halves(seed=5, c=70, rows=(300, 200))
    a, b, both = consumers(xa, xb, w)
    assert a.prepared.regress and b.prepared.regress
    order = error_curve([both], max_remove=65).order
    got = direction_errors(a, b, both.prepared, order, ridge=DEFAULT_RIDGE, block=block)
    np.testing.assert_allclose(got, explicit(a, xb, both, order), rtol=1e-6, atol=1e-10)
    with pytest.raises(InvalidInputError, match="block"):
        direction_errors(a, b, both.prepared, order, ridge=DEFAULT_RIDGE, block=0)


def test_same_halves_give_the_in_sample_error() -> None:
    xa, _, w = halves(seed=1)
    a = Consumer("x", ConsumerStats(gram(xa)), w)
    curve = error_curve([a])
    got = direction_errors(a, a, a.prepared, curve.order, ridge=DEFAULT_RIDGE)
    c = a.stats.channels
    for k in range(1, curve.order.size + 1):
        kept = np.setdiff1d(np.arange(c), curve.order[:k])
        fold = least_squares_fold(a, kept.tolist(), curve.order[:k].tolist())
        in_sample = fold[2] / a.prepared.inflation(c - k)
        assert got[k] == pytest.approx(in_sample, rel=1e-8, abs=1e-12)


def test_non_negative_symmetric_deterministic_and_above_in_sample() -> None:
    xa, xb, w = halves(seed=2)
    a, b, both = consumers(xa, xb, w)
    one, other = crossfit_curve([a], [b]), crossfit_curve([b], [a])
    assert np.all(one.errors >= 0) and np.all(np.diff(one.errors) >= 0)
    np.testing.assert_allclose(one.errors, other.errors, rtol=1e-10, atol=1e-14)
    again = crossfit_curve([a], [b])
    np.testing.assert_array_equal(one.errors, again.errors)
    # a fold fitted on other rows does worse on average than on its own rows
    in_sample = [
        direction_errors(h, h, both.prepared, one.order, ridge=DEFAULT_RIDGE) for h in (a, b)
    ]
    assert one.errors[-2] >= np.mean([e[-2] for e in in_sample])


def test_exactly_dependent_channels_stay_free() -> None:
    x = planted_maps().transpose(0, 2, 3, 1).reshape(40, 16, 8)
    xa, xb = x[:20].reshape(-1, 8), x[20:].reshape(-1, 8)
    w = np.random.default_rng(4).normal(size=(6, 8, 1))
    a, b, _ = consumers(xa, xb, w)
    curve = crossfit_curve([a], [b])
    assert curve.errors[3] < 1e-6  # the 3 planted channels
    assert curve.errors[4] > 1e-3  # the fourth is not replaceable


def test_bad_inputs_are_clear_errors() -> None:
    xa, xb, w = halves()
    a, b, _ = consumers(xa, xb, w)
    other = Consumer("x", ConsumerStats(gram(xb[:, :9])), w[:, :9])
    with pytest.raises(InvalidInputError, match="same consumer"):
        crossfit_curve([a], [other])
    with pytest.raises(InvalidInputError, match="same consumer"):
        crossfit_curve([a], [Consumer("x", b.stats, None)])
    with pytest.raises(InvalidInputError, match="same consumers in both"):
        crossfit_curve([a], [])
    with pytest.raises(InvalidInputError, match="shape"):
        split_stats(gram(xa), gram(xb[:, :9]), "x")
    with pytest.raises(InvalidInputError, match="not a part"):
        split_stats(gram(xa), gram(xa) + gram(xb), "x")


def test_curves_of_a_model_and_planning_with_held_out_statistics() -> None:
    man, layers = tiny_manifest()
    full = planted_stats()
    x = planted_maps().transpose(0, 2, 3, 1).reshape(-1, 8)
    part = {"b": gram(x[: x.shape[0] // 2]), "fc": full["fc"] / 2}
    found = group_consumers(layers, man, full)
    pooled = found.curves(found.consumers)
    curves = crossfit_curves(found, part, pooled)
    assert set(curves) == set(pooled)
    for gid, cv in curves.items():
        np.testing.assert_array_equal(cv.order, pooled[gid].order)
    for workers in (1, 3):  # threads compute whole directions: the same bits
        again = crossfit_curves(found, part, pooled, workers=workers)
        inside = crossfit_curves(found, part, ids=list(pooled), workers=workers)  # pooled here
        assert list(again) == list(curves) == list(inside)
        for gid, cv in again.items():
            np.testing.assert_array_equal(cv.errors, curves[gid].errors)
            np.testing.assert_array_equal(inside[gid].errors, curves[gid].errors)
            np.testing.assert_array_equal(inside[gid].order, curves[gid].order)
    with pytest.raises(InvalidInputError, match="pooled curves or the group ids"):
        crossfit_curves(found, part)
    with pytest.raises(InvalidInputError, match="workers"):
        crossfit_curves(found, part, pooled, workers=0)
    for bad in (part["b"][:-1], part["b"][0], np.zeros((3, 3))):  # a raw shape that is not S's
        with pytest.raises(InvalidInputError, match="have shape"):
            crossfit_curves(found, {**part, "b": bad}, pooled)
    with pytest.raises(InvalidInputError, match="no held-out statistics for fc"):
        crossfit_curves(found, {"b": part["b"]}, pooled)
    kw = {"method": "mrp", "target": Target(flops=0.25), "params_total": man.params_total}
    plan = plan_layers(layers, manifest=man, stats=full, holdout_stats=part, **kw)  # type: ignore[arg-type]
    assert "cross-fitted error curves" in plan.rule
    own = plan_layers(
        layers, manifest=man, stats=full, holdout_stats=part, allocation="method", **kw
    )  # type: ignore[arg-type]
    assert "cross-fitted error curves" in own.rule  # the method's own counts say it too
    plain = plan_layers(layers, manifest=man, stats=full, allocation="method", **kw)  # type: ignore[arg-type]
    assert "cross-fitted" not in plain.rule
    assert plan.achieved["flops"] >= 0.25
    with pytest.raises(InvalidInputError, match="held-out statistics"):
        plan_layers(layers, manifest=man, holdout_stats=part, **kw)  # type: ignore[arg-type]


def test_nearly_collinear_channels_keep_the_precision_of_single_steps() -> None:
    """Channels that are linear combinations of others up to 1e-6 noise make Q_JJ of a block
    ill-conditioned: the blocked path must still agree with single removals and the
    definition."""
    rng = np.random.default_rng(7)
    base = rng.normal(size=(400, 30))
    x = np.concatenate(
        [base, base @ rng.normal(size=(30, 30)) + 1e-6 * rng.normal(size=(400, 30))], 1
    )
    xa, xb = x[:240], x[240:]
    w = rng.normal(size=(5, 60, 1))
    a, b, both = consumers(xa, xb, w)
    order = error_curve([both], max_remove=50).order
    one = direction_errors(a, b, both.prepared, order, ridge=DEFAULT_RIDGE, block=1)
    blocked = direction_errors(a, b, both.prepared, order, ridge=DEFAULT_RIDGE)
    np.testing.assert_allclose(blocked, one, rtol=1e-7, atol=1e-15)
    np.testing.assert_allclose(blocked, explicit(a, xb, both, order), rtol=1e-5, atol=1e-9)


def test_curve_workers_follow_the_blas_threads_allowed() -> None:
    from threadpoolctl import threadpool_limits

    from graphs.compensated import curve_workers

    with threadpool_limits(limits=1):
        assert curve_workers() == 1  # a service worker limited to one thread runs one curve
    assert curve_workers() >= 1


def test_the_metric_factor_is_kept_only_where_it_is_smaller() -> None:
    xa, _, _ = halves(seed=8, c=12, rows=(200, 150))
    narrow = Consumer("x", ConsumerStats(gram(xa)), np.ones((3, 12, 1)))  # 3 rows < 12 inputs
    wide = Consumer("x", ConsumerStats(gram(xa)), np.ones((4, 12, 9)))  # 36 rows >= 12
    rows = narrow.prepared.metric_rows
    assert rows is not None and rows.shape == (3, 12)
    np.testing.assert_allclose(rows.T @ rows, narrow.prepared.metric, rtol=1e-12, atol=1e-15)
    assert wide.prepared.metric_rows is None
