"""Small helpers on label vectors shared by the methods."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


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
    n = U.shape[0]
    out = np.zeros(n)
    if n == 0:
        return out
    sizes = np.bincount(labels)
    shared = np.flatnonzero(sizes[labels] > 1)  # singletons keep 0
    if shared.size == 0:
        return out
    _, group = np.unique(labels[shared], return_inverse=True)
    member = sp.csr_matrix(
        (np.ones(shared.size), (group, np.arange(shared.size))),
        shape=(group.max() + 1, shared.size),
    )
    sums = np.asarray(member @ U[shared])  # (groups, d): Σ of each group's rows
    Us = U[shared]
    total = np.einsum("ij,ij->i", Us, sums[group])
    self_sim = np.einsum("ij,ij->i", Us, Us)
    out[shared] = (total - self_sim) / (sizes[labels[shared]] - 1)
    return out


def round_list(x: np.ndarray, decimals: int = 6) -> list[float]:
    """Floats rounded for byte-stable JSON (−0.0 becomes 0.0)."""
    return [float(v) + 0.0 for v in np.round(np.asarray(x, dtype=np.float64), decimals)]
