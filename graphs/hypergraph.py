"""The kNN hypergraph of a layer's filters and its normalized Laplacian (design §4, hsc).

One hyperedge per filter: the filter (its *centre*) and those of its k nearest neighbours whose
cosine is strictly above the null-calibrated threshold of :func:`graphs.similarity.
null_cosine_threshold`. On i.i.d. random filters no pair passes that threshold (with probability
1 - α), so every hyperedge is a singleton and the hypergraph has no structure to find: this is
what keeps the redundancy figures of :mod:`graphs.hsc` calibrated (design §3).

Hyperedge e is indexed like its centre filter, so the incidence matrix H is square, (n, n):
``H[v, e]`` is the weight with which filter v belongs to the hyperedge centred at filter e.

Everything is sparse: memory is O(n·k) beyond the blockwise kNN search.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from graphs.errors import InvalidInputError
from graphs.similarity import cosine_knn

if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT_K = 5


def knn_incidence(U: np.ndarray, *, k: int = DEFAULT_K, threshold: float) -> sp.csr_matrix:
    """Weighted incidence matrix of the null-calibrated kNN hypergraph.

    Hyperedge e holds filter e with weight 1 and each of its up-to-k nearest neighbours v (by
    cosine) with ``cos(v, e) > threshold``, with weight ``exp(-d² / mean d²)``: d² = 2 - 2 cos is
    the squared Euclidean distance between the unit filters and the mean runs over all retained
    (centre, neighbour) pairs of the layer. All-zero rows (dead filters) are nobody's neighbour
    and get only their own singleton hyperedge. Hyperedge weights are left to
    :func:`zhou_laplacian` (1 each by default).

    Args:
        U: unit-norm filters (zero rows allowed), shape (n, d).
        k: neighbours per hyperedge; clipped to n - 1.
        threshold: cosine a neighbour must strictly exceed.

    Returns:
        CSR matrix H of shape (n_vertices, n_edges) = (n, n), entries in (0, 1], ``H[e, e] = 1``.
    """
    n = U.shape[0]
    if k < 1:
        raise InvalidInputError(f"k must be at least 1, got {k}")
    centre = np.arange(n)
    rows, cols, vals = [centre], [centre], [np.ones(n)]
    kk = min(k, n - 1)
    if kk >= 1:
        idx, cos = cosine_knn(U, kk)
        alive = np.any(U != 0, axis=1)
        keep = (cos > threshold) & alive[:, None] & alive[idx]
        d2 = np.clip(2.0 - 2.0 * cos[keep], 0.0, 4.0)
        mean = float(d2.mean()) if d2.size else 0.0
        weight = np.exp(-d2 / mean) if mean > 0 else np.ones_like(d2)
        rows.append(idx[keep])
        cols.append(np.broadcast_to(centre[:, None], idx.shape)[keep])
        vals.append(weight)
    H = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )
    H.eliminate_zeros()  # weights that underflowed to 0 are not incidences
    H.sort_indices()
    return H


def _degrees(H: sp.csr_matrix, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertex degrees Dv = H W 1, shape (n_vertices,), and edge degrees De = Hᵀ 1 (n_edges,)."""
    dv = np.asarray(H @ w, dtype=np.float64).ravel()
    de = np.asarray(H.sum(axis=0), dtype=np.float64).ravel()
    return dv, de


def _edge_weights(H: sp.spmatrix, w: np.ndarray | None) -> np.ndarray:
    if w is None:
        return np.ones(H.shape[1])
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (H.shape[1],) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InvalidInputError(
            f"hyperedge weights must be {H.shape[1]} finite non-negative values, got {w.shape}"
        )
    return w


def zhou_laplacian(H: sp.spmatrix, w: np.ndarray | None = None) -> sp.csr_matrix:
    """Normalized hypergraph Laplacian of Zhou, Huang and Schölkopf (2006).

    Δ = I − Dv^-1/2 H W De^-1 Hᵀ Dv^-1/2 with Dv = H W 1 and De = Hᵀ 1. With non-negative
    incidence weights, Dv^-1 H W De^-1 Hᵀ is row-stochastic, so Δ is symmetric PSD with spectrum
    in [0, 1]; each connected component contributes exactly one zero eigenvalue. Vertices or
    hyperedges of zero degree contribute nothing (their Δ row is the identity row).

    Args:
        H: incidence matrix, shape (n_vertices, n_edges), entries >= 0.
        w: hyperedge weights, shape (n_edges,); 1 each when None.

    Returns:
        CSR matrix of shape (n_vertices, n_vertices), exactly symmetric.
    """
    Hc = sp.csr_matrix(H, dtype=np.float64)
    weights = _edge_weights(Hc, w)
    dv, de = _degrees(Hc, weights)
    inv_sqrt_dv = np.divide(1.0, np.sqrt(dv), out=np.zeros_like(dv), where=dv > 0)
    edge_scale = np.sqrt(np.divide(weights, de, out=np.zeros_like(de), where=de > 0))
    A = sp.diags(inv_sqrt_dv) @ Hc @ sp.diags(edge_scale)
    theta = (A @ A.T).tocsr()
    theta = (theta + theta.T) * 0.5  # a + b == b + a in floating point: exactly symmetric
    delta = sp.identity(Hc.shape[0], format="csr") - theta
    return sp.csr_matrix(delta)


def structure_step(
    H0: sp.csr_matrix,
    data: np.ndarray,
    B: np.ndarray,
    block: np.ndarray,
    *,
    step: float,
    mu: float,
) -> np.ndarray:
    """One projected gradient step of hypergraph structure learning.

    Minimizes tr(Cᵀ Δ(H) C) + (μ/2)‖H − H0‖² over the support of H0 with the degrees held fixed:
    the gradient of the trace is −2 Dv^-1/2 C Cᵀ Dv^-1/2 H W De^-1 (W = I), evaluated entry by
    entry on the support as −2 B[v]·Q[e] / De[e] with B = Dv^-1/2 C and Q = Hᵀ B; no n×n matrix
    is formed. The objective separates over the blocks (connected components) of C, so each
    block takes its own step length: ``step`` divided by the block's largest trace gradient
    (a normalized gradient step). H is then clipped to [0, 1], centres are kept at 1, and the
    support never grows (entries may reach 0 and stay in the support).

    Args:
        H0: the kNN incidence, CSR of shape (n, n) with sorted indices.
        data: the current incidence values on H0's pattern, shape (nnz,).
        B: Dv^-1/2 C, shape (n, K_max): row v holds vertex v's embedding (zero-padded).
        block: block id of each vertex, shape (n,); a hyperedge lies inside one block.
        step: largest change of an entry due to the trace term in one step.
        mu: weight of the proximal term pulling H back to H0.

    Returns:
        the new incidence values on H0's pattern, shape (nnz,), in [0, 1].
    """
    n = H0.shape[0]
    v = np.repeat(np.arange(n), np.diff(H0.indptr))
    e = H0.indices
    H = with_values(H0, data)
    de = np.asarray(H.sum(axis=0)).ravel()
    Q = np.asarray(H.T @ B)  # (n_edges, K_max)
    grad = -2.0 * np.einsum("ij,ij->i", B[v], Q[e]) / de[e]
    scale = np.zeros(int(block.max()) + 1 if block.size else 0)
    np.maximum.at(scale, block[e], np.abs(grad))
    factor = np.divide(step, scale, out=np.zeros_like(scale), where=scale > 0)[block[e]]
    out = np.clip(data - factor * grad - step * mu * (data - H0.data), 0.0, 1.0)
    out[v == e] = 1.0
    return out


def with_values(H0: sp.csr_matrix, data: np.ndarray) -> sp.csr_matrix:
    """H0's sparsity pattern with other values (explicit zeros kept), shape H0.shape."""
    return sp.csr_matrix((data, H0.indices, H0.indptr), shape=H0.shape)


def to_hypernetx(H: sp.spmatrix, names: Sequence[str] | None = None) -> Any:
    """A :class:`hypernetx.Hypergraph` with the same hyperedges and incidence weights.

    Hyperedge e is named after its centre filter; nodes are named ``names[v]`` (or ``v``).

    Args:
        H: incidence matrix, shape (n_vertices, n_edges); edge e's centre is vertex e.
        names: optional vertex names, length n_vertices.

    Returns:
        ``hypernetx.Hypergraph`` whose edge ``names[e]`` holds the vertices v with H[v, e] > 0,
        with cell weight H[v, e].
    """
    import hypernetx as hnx  # slow to import: only when a hypergraph is exported

    labels: list[Any] = list(range(H.shape[0])) if names is None else list(names)
    if len(labels) != H.shape[0] or H.shape[1] > len(labels):
        raise InvalidInputError(f"need {H.shape[0]} names for a hypergraph of shape {H.shape}")
    Hc = sp.csc_matrix(H)
    Hc.sort_indices()
    setsystem: dict[Any, dict[Any, dict[str, float]]] = {}
    for e in range(Hc.shape[1]):
        lo, hi = Hc.indptr[e], Hc.indptr[e + 1]
        cells = {
            labels[int(v)]: {"weight": float(x)}
            for v, x in zip(Hc.indices[lo:hi], Hc.data[lo:hi], strict=True)
            if x > 0
        }
        if cells:
            setsystem[labels[e]] = cells
    return hnx.Hypergraph(setsystem)
