"""Small helpers on label vectors shared by the methods."""

from __future__ import annotations

import numpy as np


def relabel_by_first_occurrence(labels: np.ndarray) -> np.ndarray:
    """Relabel so that labels appear as 0, 1, 2, … in filter order.

    Makes labels independent of the solver's internal numbering: permuting the filters permutes
    the labels' positions and nothing else.

    Args:
        labels: int array of shape (n,).

    Returns:
        int64 array of shape (n,).
    """
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse.ravel()]


def mean_cosine_to_group(U: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean cosine of each unit row to the other rows with its label; 0 for singletons.

    Args:
        U: unit-norm rows, shape (n, d).
        labels: int labels 0..K-1, shape (n,).

    Returns:
        float64 array of shape (n,). O(n·d): uses u_i · Σ_group u_j.
    """
    K = int(labels.max()) + 1 if labels.size else 0
    sums = np.zeros((K, U.shape[1]))
    np.add.at(sums, labels, U)
    sizes = np.bincount(labels, minlength=K)
    self_sim = np.einsum("ij,ij->i", U, U)
    total = np.einsum("ij,ij->i", U, sums[labels])
    others = sizes[labels] - 1
    out = np.zeros(U.shape[0])
    np.divide(total - self_sim, others, out=out, where=others > 0)
    return out


def round_list(x: np.ndarray, decimals: int = 6) -> list[float]:
    """Floats rounded for byte-stable JSON (−0.0 becomes 0.0)."""
    return [float(v) + 0.0 for v in np.round(np.asarray(x, dtype=np.float64), decimals)]
