"""Functional redundancy: calibration, invariances, agreement with a slow reference, exactness."""

from __future__ import annotations

import numpy as np
import pytest

from graphs.consumers import Consumer, ConsumerStats, channel_gram, dense_weight
from graphs.errors import InvalidInputError
from graphs.fold import fold_weight
from graphs.functional import (
    error_curve,
    functional_redundancy,
    least_squares_fold,
    predicted_error,
)
from graphs.options import DEFAULT_EPSILON


def gram(X: np.ndarray) -> np.ndarray:
    """S = Σ [x, 1]ᵀ[x, 1] over the rows of X (rows × c)."""
    Z = np.hstack([X, np.ones((X.shape[0], 1))])
    return Z.T @ Z


def planted(rng: np.random.Generator, n: int, m: int, noise: float, rows: int) -> np.ndarray:
    """m independent channels, n − m noisy linear combinations of them (columns shuffled)."""
    base = rng.normal(size=(rows, m))
    mix = base @ rng.normal(size=(m, n - m)) / np.sqrt(m)
    X = np.hstack([base, mix + noise * rng.normal(size=mix.shape)])
    return X[:, rng.permutation(n)] * rng.uniform(0.5, 3, size=n) + rng.normal(size=n)


def consumer(X: np.ndarray, W: np.ndarray | None, name: str = "c") -> Consumer:
    return Consumer(name, ConsumerStats(gram(X)), None if W is None else W)


@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("n", [16, 64, 200])
def test_independent_channels_are_not_redundant(n: int, with_weight: bool) -> None:
    """i.i.d. channels contributing alike to the output (with a weight, a channel's scale is its
    contribution; without one, the figure is scale-free, so the scales vary)."""
    rng = np.random.default_rng(n)
    X = rng.normal(size=(20 * n, n)) * (1.0 if with_weight else rng.uniform(0.5, 2, size=n))
    W = rng.normal(size=(32, n, 1)) if with_weight else None
    assert functional_redundancy([consumer(X, W)]) <= 0.05


@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize(("n", "m"), [(32, 8), (64, 40), (128, 16)])
def test_planted_combinations_give_one_minus_m_over_n(n: int, m: int, with_weight: bool) -> None:
    rng = np.random.default_rng(n + m)
    X = planted(rng, n, m, noise=0.01, rows=20 * n)
    W = rng.normal(size=(24, n, 3)) if with_weight else None
    assert functional_redundancy([consumer(X, W)]) == pytest.approx(1 - m / n, abs=0.05)


def test_invariant_to_permutation_rescaling_and_shift() -> None:
    rng = np.random.default_rng(1)
    n = 40
    X = planted(rng, n, 12, noise=0.05, rows=1000)
    W = rng.normal(size=(10, n, 4))
    base = error_curve([consumer(X, W)])
    perm = rng.permutation(n)
    s = rng.uniform(0.1, 10, size=n)
    # rescale channel j by s_j and its weight column by 1/s_j: the same function
    moved = error_curve([consumer(X[:, perm] * s + 5.0, W[:, perm] / s[None, :, None])])
    np.testing.assert_allclose(moved.errors, base.errors, rtol=1e-6, atol=1e-10)
    assert moved.redundancy() == base.redundancy()
    np.testing.assert_array_equal(perm[moved.order[:20]], base.order[:20])


def _reference_error(X: np.ndarray, W: np.ndarray, kept: list[int], removed: list[int]) -> float:
    """Explicit least squares on the rows and the output error, taps as independent rows,
    scaled to the expected out-of-sample error n(n−1)/((n−p−1)(n−p−2)) of p predictors."""
    rows = X.shape[0]
    if not removed:
        return 0.0
    A = np.hstack([X[:, kept], np.ones((rows, 1))])
    coef = np.linalg.lstsq(A, X[:, removed], rcond=None)[0]
    resid = X[:, removed] - A @ coef  # (rows, |R|)
    Xc = X - X.mean(axis=0)
    err = np.einsum("nr,ort->ont", resid, W[:, removed, :]).var(axis=1).sum(axis=1)
    var = np.einsum("nc,oct->ont", Xc, W).var(axis=1).sum(axis=1)
    p = len(kept)
    return float(np.mean(err / var)) * rows * (rows - 1) / ((rows - p - 1) * (rows - p - 2))


def test_fast_greedy_path_agrees_with_explicit_lstsq() -> None:
    rng = np.random.default_rng(2)
    n = 9
    X = planted(rng, n, 5, noise=0.3, rows=400)
    W = rng.normal(size=(6, n, 3))
    curve = error_curve([consumer(X, W)], ridge=0.0)
    kept, removed, errors = list(range(n)), list[int](), [0.0]
    for _ in range(n - 1):
        trial = {
            j: _reference_error(X, W, [k for k in kept if k != j], sorted([*removed, j]))
            for j in kept
        }
        j = min(trial, key=lambda k: (trial[k], k))
        kept.remove(j)
        removed.append(j)
        errors.append(max(errors[-1], trial[j]))
    np.testing.assert_array_equal(curve.order, removed)
    np.testing.assert_allclose(curve.errors, errors, rtol=1e-6, atol=1e-12)
    r = sorted(removed[:4])
    k = [i for i in range(n) if i not in r]
    pred = predicted_error([consumer(X, W)], k, r, ridge=0.0)
    assert pred == pytest.approx(_reference_error(X, W, k, r), rel=1e-6)


def _conv(x: np.ndarray, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Valid cross-correlation, x: (c, H, W), w: (out, c, kh, kw) → (out, H', W')."""
    _, _, kh, kw = w.shape
    h, wd = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    y = np.zeros((w.shape[0], h, wd)) + bias[:, None, None]
    for i in range(kh):
        for j in range(kw):
            y += np.einsum("oc,chw->ohw", w[:, :, i, j], x[:, i : i + h, j : j + wd])
    return y


@pytest.mark.parametrize("k", [1, 3])
def test_fold_of_exact_combinations_gives_zero_output_error(k: int) -> None:
    rng = np.random.default_rng(k)
    c, removed = 10, [2, 5, 7]
    kept = [i for i in range(c) if i not in removed]
    x = rng.normal(size=(c, 12, 12)) + 1.0
    x[removed] = np.einsum("rk,khw->rhw", rng.normal(size=(3, 7)), x[kept]) + 0.5
    w = rng.normal(size=(4, c, k, k))
    bias = rng.normal(size=4)
    cons = Consumer("conv", ConsumerStats(gram(x.reshape(c, -1).T)), dense_weight(w))
    B, b, err = least_squares_fold(cons, kept, removed)
    assert err < 1e-9
    w2, bias2 = fold_weight(w, bias, kept=kept, removed=removed, matrix=B, shift=b)
    x_kept = x.copy()
    x_kept[removed] = 0.0
    y = _conv(x, w, bias)
    np.testing.assert_allclose(_conv(x_kept, w2, bias2), y, atol=1e-5 * np.abs(y).max())


def test_linear_after_flatten_channel_gram_matches_rows_of_positions() -> None:
    rng = np.random.default_rng(4)
    c, p = 5, 6
    maps = rng.normal(size=(50, c, p))
    full = gram(maps.reshape(50, c * p))
    per_position = gram(maps.transpose(0, 2, 1).reshape(-1, c))
    np.testing.assert_allclose(channel_gram(full, p), per_position, rtol=1e-12)
    w = rng.normal(size=(3, c * p))
    assert dense_weight(w, per_channel=p).shape == (3, c, p)
    with pytest.raises(InvalidInputError, match="positions"):
        channel_gram(full, 7)


def test_coupled_consumers_sum_and_constant_channels_are_free() -> None:
    rng = np.random.default_rng(5)
    n = 12
    X1, X2 = rng.normal(size=(300, n)), rng.normal(size=(300, n))
    X1[:, 3] = 2.5  # constant at the first consumer
    W1, W2 = rng.normal(size=(4, n, 1)), rng.normal(size=(5, n, 1))
    c1, c2 = consumer(X1, W1, "a"), consumer(X2, W2, "b")
    kept, removed = [i for i in range(n) if i not in (3, 8)], [3, 8]
    both = predicted_error([c1, c2], kept, removed)
    assert both == pytest.approx(
        predicted_error([c1], kept, removed) + predicted_error([c2], kept, removed)
    )
    B, b, err = least_squares_fold(c1, [i for i in range(n) if i != 3], [3])
    assert err == 0.0 and b[0] == pytest.approx(2.5) and not B.any()
    assert error_curve([c1]).order[0] == 3


def test_grouped_consumer_takes_over_only_within_its_conv_group() -> None:
    rng = np.random.default_rng(6)
    c = 8
    X = rng.normal(size=(500, c))
    X[:, 1] = X[:, 5] * 2.0  # correlated across the two conv groups {0..3} and {4..7}
    X[:, 2] = X[:, 0] - X[:, 3]
    w = rng.normal(size=(4, c // 2, 1, 1))
    w[:, 1] += 3.0  # channel 1 matters to its outputs
    cons = Consumer("g", ConsumerStats(gram(X)), dense_weight(w, groups=2), groups=2)
    kept = [0, 3, 4, 5, 6, 7]
    B, _, err = least_squares_fold(cons, kept, [1, 2])
    assert not B[:, 2:].any()  # kept 4..7 are in the other conv group
    assert err > 0.01  # channel 1's partner 5 is not in its group
    B, _, err = least_squares_fold(cons, [0, 1, 3, 4, 5, 6, 7], [2])
    assert err < 1e-9 and not B[0, 3:].any()


def test_bad_inputs_are_clear_errors() -> None:
    rng = np.random.default_rng(7)
    S = gram(rng.normal(size=(20, 3)))
    with pytest.raises(InvalidInputError, match="square"):
        ConsumerStats(S[:3])
    bad = S.copy()
    bad[0, 1] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        ConsumerStats(bad)
    bad = S.copy()
    bad[0, 1] += 1.0
    with pytest.raises(InvalidInputError, match="symmetric"):
        ConsumerStats(bad)
    with pytest.raises(InvalidInputError, match="row count"):
        ConsumerStats(np.zeros((4, 4)))
    cons = Consumer("c", ConsumerStats(S))
    with pytest.raises(InvalidInputError, match="disjoint"):
        least_squares_fold(cons, [0, 1], [1])
    with pytest.raises(InvalidInputError, match="ridge"):
        least_squares_fold(cons, [0, 1], [2], ridge=-1.0)
    with pytest.raises(InvalidInputError, match="epsilon"):
        functional_redundancy([cons], epsilon=float("nan"))
    with pytest.raises(InvalidInputError, match="same number"):
        error_curve([cons, Consumer("d", ConsumerStats(gram(rng.normal(size=(20, 4)))))])
    with pytest.raises(InvalidInputError, match="max_remove"):
        error_curve([cons], max_remove=3)
    with pytest.raises(InvalidInputError, match="taps"):
        Consumer("c", ConsumerStats(S), np.ones((2, 4, 1)))
    with pytest.raises(InvalidInputError, match="groups"):
        Consumer("c", ConsumerStats(S), groups=2)
    with pytest.raises(InvalidInputError, match="at least one consumer"):
        error_curve([])
    assert DEFAULT_EPSILON > 0


def test_fewer_rows_than_channels_is_not_mistaken_for_redundancy() -> None:
    """With rows ≤ channels + 2 any channel is fitted exactly in sample; the figure must not
    call that redundancy (mean folds only), and near that limit the out-of-sample factor
    keeps independent channels at ≈ 0."""
    rng = np.random.default_rng(8)
    n = 64
    W = rng.normal(size=(16, n, 1))
    for rows in (40, 66, 100):
        X = rng.normal(size=(rows, n))
        cons = consumer(X, W)
        assert functional_redundancy([cons]) <= 0.05
    B, _, err = least_squares_fold(consumer(rng.normal(size=(40, n)), W), list(range(1, n)), [0])
    assert not B.any() and err > 0
