"""Data-free compensation: a removed channel replaced by its expected value (design §8).

Without calibration data, the input of a consumer that follows BatchNorm and a ReLU/ReLU6 is
modelled per channel as ``act(γ z + β)`` with z ~ N(0, 1) (BN's normalized input) and channels
independent. :func:`rectified_moments` gives each channel's mean and variance in closed form
(the rectified / clipped Gaussian), and :func:`moments_gram` turns them into a second-moment
matrix S with no correlations. Handed to the planner as ``stats``, such an S gives folds with
B = 0 and b = the removed channels' means (kind ``mean``): the consumer's bias absorbs what the
removed channels contributed on average. A channel with γ ≈ 0 is constant — exactly redundant,
error 0 — and is removed first; otherwise the predicted error is the channel's variance share.
Near-duplicate filters (positively homogeneous activations only) are the one exception to
independence: :mod:`graphs.merge` correlates them, so that their folds become merges.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.special import ndtr

from graphs.errors import InvalidInputError

Activation = Literal["relu", "relu6", "identity"]
_TINY = 1e-12


def _phi(t: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * t * t) / np.sqrt(2 * np.pi)


def _window(mu: np.ndarray, sd: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, ...]:
    """P, E[y·1], E[y²·1] over lo < y < hi for y ~ N(mu, sd²) (sd > 0)."""
    a = (lo - mu) / sd
    b = (hi - mu) / sd
    pa, pb = ndtr(a), ndtr(b)
    fin_a, fin_b = np.isfinite(a), np.isfinite(b)
    a0, b0 = np.where(fin_a, a, 0.0), np.where(fin_b, b, 0.0)
    fa = np.where(fin_a, _phi(a0), 0.0)
    fb = np.where(fin_b, _phi(b0), 0.0)
    afa, bfb = a0 * fa, b0 * fb
    p = pb - pa
    m1 = mu * p + sd * (fa - fb)
    m2 = mu * mu * p + 2 * mu * sd * (fa - fb) + sd * sd * (p + afa - bfb)
    return p, m1, m2


def rectified_moments(
    gamma: np.ndarray, beta: np.ndarray, *, activation: Activation = "relu"
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of ``act(γ z + β)``, z ~ N(0, 1), per channel; shapes (c,)."""
    g = np.abs(np.asarray(gamma, dtype=np.float64)).reshape(-1)
    b = np.asarray(beta, dtype=np.float64).reshape(-1)
    if g.shape != b.shape or not (np.all(np.isfinite(g)) and np.all(np.isfinite(b))):
        raise InvalidInputError("gamma and beta must be finite arrays of the same length")
    if activation not in ("relu", "relu6", "identity"):
        raise InvalidInputError(
            f"unknown activation {activation!r}", hint="Use relu, relu6 or identity."
        )
    const = g <= _TINY * np.maximum(np.abs(b), 1.0)
    sd = np.where(const, 1.0, g)
    if activation == "identity":
        return b.copy(), np.where(const, 0.0, g * g)
    hi = 6.0 if activation == "relu6" else np.inf
    p_top = 1.0 - ndtr((hi - b) / sd) if np.isfinite(hi) else np.zeros_like(b)
    _, m1, m2 = _window(b, sd, 0.0, hi)
    top = hi if np.isfinite(hi) else 0.0
    mean = m1 + top * p_top
    second = m2 + top * top * p_top
    clipped = np.clip(b, 0.0, hi)
    mean = np.where(const, clipped, mean)
    var = np.where(const, 0.0, np.clip(second - mean * mean, 0.0, None))
    return mean, var


def moments_gram(mean: np.ndarray, var: np.ndarray, *, rows: float = 1.0) -> np.ndarray:
    """S (c+1, c+1) of independent channels with these means and variances (``rows`` rows)."""
    mu = np.asarray(mean, dtype=np.float64).reshape(-1)
    v = np.asarray(var, dtype=np.float64).reshape(-1)
    if mu.shape != v.shape or np.any(v < 0) or not np.all(np.isfinite(mu) & np.isfinite(v)):
        raise InvalidInputError("means and variances must be finite, variances >= 0")
    if not rows > 0:
        raise InvalidInputError(f"rows must be positive, got {rows}")
    c = mu.size
    S = np.empty((c + 1, c + 1))
    S[:c, :c] = np.diag(v) + np.outer(mu, mu)
    S[:c, c] = S[c, :c] = mu
    S[c, c] = 1.0
    return S * rows
