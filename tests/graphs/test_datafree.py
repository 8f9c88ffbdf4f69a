"""Data-free compensation: rectified-Gaussian moments and mean folds."""

from __future__ import annotations

import numpy as np
import pytest

from graphs.consumers import Consumer, ConsumerStats
from graphs.datafree import moments_gram, rectified_moments
from graphs.errors import InvalidInputError
from graphs.functional import error_curve, least_squares_fold


@pytest.mark.parametrize("activation", ["relu", "relu6", "identity"])
def test_moments_match_monte_carlo(activation: str) -> None:
    rng = np.random.default_rng(0)
    gamma = np.array([1.0, 0.3, 2.5, -1.5, 4.0])
    beta = np.array([0.0, -0.5, 1.0, 3.0, 5.5])
    z = rng.normal(size=(400_000, 1))
    y = gamma * z + beta
    act = {"relu": np.maximum(y, 0), "relu6": np.clip(y, 0, 6), "identity": y}[activation]
    mean, var = rectified_moments(gamma, beta, activation=activation)  # type: ignore[arg-type]
    np.testing.assert_allclose(mean, act.mean(axis=0), atol=0.02)
    np.testing.assert_allclose(var, act.var(axis=0), rtol=0.02, atol=0.02)


def test_zero_gamma_is_a_constant_channel_removed_first_with_no_error() -> None:
    gamma = np.array([1.0, 0.0, 0.8, 1.2])
    beta = np.array([0.1, 0.7, -0.2, 0.3])
    mean, var = rectified_moments(gamma, beta, activation="relu6")
    assert var[1] == 0.0 and mean[1] == pytest.approx(0.7)
    S = moments_gram(mean, var, rows=10.0)
    w = np.random.default_rng(1).normal(size=(3, 4, 1))
    cons = Consumer("c", ConsumerStats(S), w)
    curve = error_curve([cons])
    assert curve.order[0] == 1 and curve.errors[1] == 0.0 and curve.errors[2] > 0.0
    B, b, err = least_squares_fold(cons, [0, 2, 3], [1])
    assert not B.any() and b[0] == pytest.approx(0.7) and err == 0.0
    B, b, _ = least_squares_fold(cons, [1, 2, 3], [0])
    assert not B.any() and b[0] == pytest.approx(mean[0])  # independent: a mean fold


def test_bad_inputs() -> None:
    with pytest.raises(InvalidInputError, match="same length"):
        rectified_moments(np.ones(2), np.ones(3))
    with pytest.raises(InvalidInputError, match="activation"):
        rectified_moments(np.ones(2), np.ones(2), activation="gelu")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="variances"):
        moments_gram(np.ones(2), -np.ones(2))
    with pytest.raises(InvalidInputError, match="rows"):
        moments_gram(np.ones(2), np.ones(2), rows=0)
