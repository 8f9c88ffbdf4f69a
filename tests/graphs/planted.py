"""Null and planted layers for calibration tests (design §3)."""

from __future__ import annotations

import numpy as np


def random_layer(n: int, d: int, seed: int) -> np.ndarray:
    """i.i.d. Gaussian filters, shape (n, d): the null model."""
    return np.random.default_rng(seed).standard_normal((n, d))


def anisotropic_layer(n: int, d: int, seed: int, *, decay: float = 1.0) -> np.ndarray:
    """Gaussian filters with a power-law covariance (eigenvalues k^-decay in a random basis).

    Like trained filters (smooth kernels, correlated input channels), unrelated filters are more
    similar than isotropic ones of the same fan-in. Shape (n, d).
    """
    rng = np.random.default_rng(seed)
    scale = np.arange(1, d + 1) ** (-decay / 2.0)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (rng.standard_normal((n, d)) * scale) @ basis.T


def planted_layer(
    m: int, r: int, d: int, seed: int, *, noise: float = 0.05, rescale: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """m Gaussian prototypes, each repeated r times with small noise, rows shuffled.

    Each copy is ``proto + noise·‖proto‖/√d · N(0, I)``, optionally scaled by a positive
    constant in [0.5, 2]. Returns ``(X, truth)``: X of shape (m·r, d) and the prototype index of
    every row, shape (m·r,).
    """
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((m, d))
    truth = np.repeat(np.arange(m), r)
    X = protos[truth] + noise * np.linalg.norm(protos[truth], axis=1, keepdims=True) / np.sqrt(
        d
    ) * rng.standard_normal((m * r, d))
    if rescale:
        X *= rng.uniform(0.5, 2.0, size=(m * r, 1))
    perm = rng.permutation(m * r)
    return X[perm], truth[perm]


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label vectors of shape (n,) describe the same partition."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))
