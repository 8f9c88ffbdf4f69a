"""graphs.merge: data-free merges of near-duplicate filters through correlated statistics."""

from __future__ import annotations

import numpy as np
import pytest

from graphs.consumers import Consumer, ConsumerStats
from graphs.datafree import moments_gram, rectified_moments
from graphs.errors import InvalidInputError
from graphs.functional import least_squares_fold
from graphs.merge import (
    DEFAULT_MERGE_THRESHOLD,
    cross_moments,
    filter_cosines,
    merge_components,
    merged_gram,
)


def _case(seed: int = 0, c: int = 8, d: int = 72) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 1.5, c)
    beta = rng.normal(size=c)
    filters = rng.normal(size=(c, d))
    return gamma, beta, filters


ROWS = 2.0**30  # nominal rows, as clients.datafree writes them (few rows: no regression at all)


@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_cross_moments_match_monte_carlo(activation: str) -> None:
    rng = np.random.default_rng(0)
    gamma = np.array([1.0, -0.5, 2.0, 0.7])
    beta = np.array([0.3, -0.4, 1.0, -1.5])
    unit = rng.normal(size=(4, 3))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    R = unit @ unit.T
    z = rng.normal(size=(1_000_000, 4)) @ np.linalg.cholesky(R + 1e-12 * np.eye(4)).T
    y = np.abs(gamma) * z + beta
    x = np.maximum(y, 0) if activation == "relu" else y
    ref = x.T @ x / len(x)
    got = cross_moments(gamma, beta, R, activation=activation)  # type: ignore[arg-type]
    np.testing.assert_allclose(got, ref, atol=0.01, rtol=0.01)
    assert np.allclose(got, got.T) and np.linalg.eigvalsh(got).min() > -1e-9


@pytest.mark.parametrize("activation", ["relu", "identity"])
@pytest.mark.parametrize("s", [0.3, 1.0, 2.5])
def test_exact_positive_multiples_fold_to_the_scale(activation: str, s: float) -> None:
    gamma, beta, filters = _case()
    j, i = 5, 2  # channel 5 = s × channel 2: filter direction, γ and β
    filters[j] = filters[i] * 3.0  # the filter's own norm does not matter, BN normalizes
    gamma[j], beta[j] = s * gamma[i], s * beta[i]
    S, comps = merged_gram(gamma, beta, filters, activation=activation, rows=ROWS)  # type: ignore[arg-type]
    assert [m.tolist() for m in comps] == [[i, j]]
    w = np.random.default_rng(1).normal(size=(4, 8, 9))
    cons = Consumer("c", ConsumerStats(S), w)
    kept = [k for k in range(8) if k != j]
    B, b, err = least_squares_fold(cons, kept, [j])
    expect = np.zeros(7)
    expect[kept.index(i)] = s
    np.testing.assert_allclose(B[0], expect, atol=1e-5 * max(s, 1))
    assert abs(b[0]) < 1e-5 and err < 1e-5
    # the fold reproduces x_j on samples drawn from the model
    z = np.random.default_rng(2).normal(size=(1000, 8))
    z[:, j] = z[:, i]
    u = gamma * z + beta
    x = np.maximum(u, 0) if activation == "relu" else u
    np.testing.assert_allclose(x[:, kept] @ B[0] + b[0], x[:, j], atol=1e-4)


def test_no_component_gives_the_independent_gram_bit_for_bit() -> None:
    gamma, beta, filters = _case(3)
    for act in ("relu", "identity"):
        S, comps = merged_gram(gamma, beta, filters, activation=act, rows=ROWS)
        ref = moments_gram(*rectified_moments(gamma, beta, activation=act), rows=ROWS)
        assert comps == [] and S.tobytes() == ref.tobytes()


def test_negative_scales_constants_and_random_filters_never_merge() -> None:
    gamma, beta, filters = _case(4, c=32, d=144)
    assert merge_components(filter_cosines(filters), threshold=DEFAULT_MERGE_THRESHOLD) == []
    filters[1] = -2.0 * filters[0]  # a negative multiple: cos = −1
    filters[3] = filters[2]  # an exact copy, but channel 3 is constant (γ = 0)
    gamma[3] = 0.0
    S, comps = merged_gram(gamma, beta, filters, activation="relu")
    assert comps == []
    ref = moments_gram(*rectified_moments(gamma, beta, activation="relu"))
    assert np.array_equal(S, ref)
    gamma[1] = -gamma[1]  # a negative γ flips the effective filter: now a positive multiple
    _, comps = merged_gram(gamma, beta, filters * np.sign(gamma)[:, None], activation="relu")
    assert [m.tolist() for m in comps] == [[0, 1]]


def test_relu6_and_other_activations_are_refused() -> None:
    gamma, beta, filters = _case()
    for act in ("relu6", "gelu", "sigmoid"):
        with pytest.raises(InvalidInputError, match="homogeneous"):
            merged_gram(gamma, beta, filters, activation=act)  # type: ignore[arg-type]


def test_permutation_invariant_and_deterministic() -> None:
    gamma, beta, filters = _case(5)
    filters[6] = filters[1] + 0.05 * filters[4]  # a near-duplicate (cos ≈ 0.999)
    filters[7] = 2.0 * filters[1]
    S, comps = merged_gram(gamma, beta, filters, activation="relu")
    assert [m.tolist() for m in comps] == [[1, 6, 7]]
    perm = np.random.default_rng(6).permutation(8)
    Sp, cp = merged_gram(gamma[perm], beta[perm], filters[perm], activation="relu")
    full = np.append(perm, 8)
    np.testing.assert_allclose(Sp, S[np.ix_(full, full)], rtol=1e-12, atol=1e-14)
    assert sorted(sorted(perm[m].tolist()) for m in cp) == [[1, 6, 7]]
    again, _ = merged_gram(gamma, beta, filters, activation="relu")
    assert again.tobytes() == S.tobytes()


def test_near_duplicates_shrink_towards_the_mean_fold() -> None:
    gamma, beta, filters = _case(7)
    rng = np.random.default_rng(8)
    gamma[4], beta[4] = gamma[0], beta[0]
    coefs = []
    for noise in (0.0, 0.15, 0.3):
        filters[4] = filters[0] + noise * np.linalg.norm(filters[0]) * rng.normal(size=72) / 8.5
        S, comps = merged_gram(gamma, beta, filters, activation="relu", rows=ROWS, threshold=0.8)
        assert [m.tolist() for m in comps] == [[0, 4]], noise
        cons = Consumer("c", ConsumerStats(S), np.ones((1, 8, 1)))
        B, _, err = least_squares_fold(cons, [0, 1, 2, 3, 5, 6, 7], [4])
        coefs.append((B[0, 0], err))
    assert coefs[0][0] == pytest.approx(1.0, abs=1e-5)
    assert coefs[0][0] > coefs[1][0] > coefs[2][0] > 0
    assert coefs[0][1] < coefs[1][1] < coefs[2][1]


def test_bad_inputs() -> None:
    gamma, beta, filters = _case()
    with pytest.raises(InvalidInputError, match="threshold"):
        merge_components(np.eye(3), threshold=0.0)
    with pytest.raises(InvalidInputError, match="one row per channel"):
        merged_gram(gamma, beta, filters[:3], activation="relu")
    with pytest.raises(InvalidInputError, match="finite"):
        filter_cosines(np.full((2, 2), np.nan))
    with pytest.raises(InvalidInputError, match="agree"):
        cross_moments(gamma, beta[:3], np.eye(8), activation="relu")
