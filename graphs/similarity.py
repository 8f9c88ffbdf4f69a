"""Cosine similarity between filters, calibrated against an isotropic null (design §3).

Two independent isotropic random vectors in R^d have cosine c with (c + 1) / 2 ~ Beta((d-1)/2,
(d-1)/2): mean 0, variance 1/d. A fixed cosine threshold therefore means different things for a
3×3×3 stem conv and a 512×3×3 conv. :func:`null_cosine_threshold` picks the threshold from the
null instead: the cosine that a pair of random filters exceeds with probability α / P, P the
number of pairs (a one-sided Bonferroni bound), so a layer of i.i.d. random filters of any width
gets no edge with probability at least 1 - α.

Everything is computed blockwise: no dense n×n matrix is held for wide layers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
from scipy.optimize import brentq
from scipy.sparse.csgraph import connected_components
from scipy.special import betaincinv

from graphs.errors import InvalidInputError
from graphs.options import DEFAULT_ALPHA, DEFAULT_MIN_EXPLAINED

BLOCK_BYTES = 2**27
"""Memory for one block of similarities (128 MiB): wide layers are processed in row blocks."""
NULL_QUANTILE = 0.25
"""Quantile of squared pairwise cosines that the layer's null is fitted to (robust to up to 75 %
of pairs being near-duplicates)."""
NULL_MIN_FILTERS = 8
NULL_MAX_ROWS = 512


def row_blocks(n: int, block_size: int | None = None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges covering ``range(n)``.

    The default size keeps one (block × n) float64 similarity block (and a temporary or two of
    the same size) within :data:`BLOCK_BYTES`, so memory stays bounded for any width.
    """
    if block_size is None:
        block_size = max(1, BLOCK_BYTES // (24 * max(n, 1)))
    for start in range(0, n, block_size):
        yield start, min(start + block_size, n)


def check_filters(X: np.ndarray, *, name: str = "filters", min_rows: int = 1) -> np.ndarray:
    """Validate a filter matrix once at a public entry; return it as float64 (n, d)."""
    A = np.asarray(X)
    if A.ndim != 2:
        raise InvalidInputError(f"{name} must be a 2-D array (n_filters, fan_in), got {A.shape}")
    if A.shape[0] < min_rows or A.shape[1] < 1:
        raise InvalidInputError(
            f"{name} needs at least {min_rows} filters of at least one value, got {A.shape}"
        )
    A = A.astype(np.float64, copy=False)
    if not np.all(np.isfinite(A)):
        raise InvalidInputError(
            f"{name} contains NaN or Inf values",
            hint="Fix or drop the layer: non-finite weights cannot be compared.",
        )
    return A


def unit_rows(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to unit L2 norm; all-zero rows stay zero.

    Args:
        X: array of shape (n, d).

    Returns:
        ``(U, norms)``: U of shape (n, d), norms of shape (n,).
    """
    # Divide by the largest entry first so that tiny (even subnormal) rows do not underflow.
    scale = np.maximum(X.max(axis=1), -X.min(axis=1)) if X.size else np.zeros(X.shape[0])
    zero = scale == 0
    U = X / np.where(zero, 1.0, scale)[:, None]
    inner = np.sqrt(np.einsum("ij,ij->i", U, U))  # no temporary of U's size
    U /= np.where(zero, 1.0, inner)[:, None]
    U[zero] = 0.0
    return U, np.where(zero, 0.0, scale * inner)


def null_cosine_threshold(n: int, dim: int, *, alpha: float = DEFAULT_ALPHA) -> float:
    """The cosine that two isotropic random filters exceed with probability α / (n(n-1)/2).

    Args:
        n: number of filters in the layer.
        dim: their dimension (fan-in).
        alpha: expected number of chance edges between random filters of the layer (for
            α < 1 also the family-wise rate); > 0.

    Returns:
        a threshold in (0, 1]; 1.0 when ``dim < 2`` (in one dimension every two filters of the
        same sign are parallel, so no pair can be told apart from chance).
    """
    return _threshold_for_dim(n, float(dim), alpha)


def null_dimension(U: np.ndarray, *, max_rows: int = NULL_MAX_ROWS) -> float:
    """Dimension of the isotropic null that matches the layer's own spread of filter directions.

    Trained filters are not isotropic: 3×3 kernels are smooth, input channels are correlated, so
    two unrelated filters of fan-in d are more similar than two random vectors of dimension d.
    Under an isotropic null in dimension m, c² ~ Beta(1/2, (m−1)/2); m is fitted so that this
    law's lower quartile equals the lower quartile of the layer's squared pairwise cosines. The
    quartile ignores the largest 75 % of c², so near-duplicates (which make c² ≈ 1) do not move
    the fit unless they are most of the pairs; and when the groups of the isotropic-null graph
    (near-duplicates beyond any doubt) split the layer so that most pairs lie across groups,
    only those pairs are used (a layer of two prototypes × many copies).

    Args:
        U: unit-norm rows of the non-zero filters, shape (n, d).
        max_rows: wider layers are fitted on this many rows (~130k pairs for 512, plenty for
            a quartile), evenly spaced in an order given by the rows' content, so the fit does
            not depend on the filters' order or scale either way.

    Returns:
        m in [2, d]; ``d`` itself when n < 8 or the layer is a few (< 8) groups of
        near-duplicates (too few independent pairs to fit), or when the fit falls below 2
        (most pairs are near-parallel: the layer's own null is degenerate, so the isotropic one
        is the only reference left).
    """
    n, d = U.shape
    if n < NULL_MIN_FILTERS or d < 2:
        return float(d)
    if n > max_rows:
        # rows ordered by their content (a fixed projection; equal keys mean equal rows), then
        # evenly spaced: the same sample whatever the filters' order
        order = np.argsort(U @ np.cos(0.7 * np.arange(d) + 0.1), kind="stable")
        U = U[order[np.linspace(0, n - 1, max_rows).round().astype(np.int64)]]
        n = max_rows
    G = U @ U.T
    iu = np.triu_indices(n, 1)
    c2 = np.square(G[iu])
    # Groups of near-duplicates: when they hold most pairs, fit on the pairs across groups only.
    n_groups, groups = connected_components(
        sp.csr_matrix(G > _threshold_for_dim(n, float(d), DEFAULT_ALPHA)), directed=False
    )
    across = groups[iu[0]] != groups[iu[1]]
    if 2 * int(across.sum()) >= c2.size:
        if n_groups < NULL_MIN_FILTERS:
            return float(d)  # a few groups of copies: too few independent pairs to fit
        c2 = c2[across]
    q = float(np.quantile(c2, NULL_QUANTILE))

    def gap(m: float) -> float:
        return float(betaincinv(0.5, (m - 1.0) / 2.0, NULL_QUANTILE)) - q

    if q <= 0 or gap(float(d)) >= 0:
        return float(d)  # at least as spread out as isotropic: the fan-in is the null
    if gap(2.0) <= 0:
        return float(d)  # degenerate: most pairs near-parallel
    return float(brentq(gap, 2.0, float(d), xtol=1e-6))


def calibrated_threshold(
    U: np.ndarray, *, alpha: float = DEFAULT_ALPHA, min_explained: float = DEFAULT_MIN_EXPLAINED
) -> tuple[float, float]:
    """The cosine above which two filters of a layer are joined as (possibly) redundant.

    Two conditions, both needed:

    * significance: the cosine is one that unrelated filters of this layer exceed with
      probability at most α / #pairs (the layer's fitted null, :func:`null_dimension`); this is
      what makes every method calibrated (random layers get no edge);
    * effect size: one filter explains at least ``min_explained`` of the other's energy, i.e.
      cos² ≥ min_explained (the best scaled copy leaves a residual 1 − cos²). Significance
      alone is not replaceability: in trained layers, thousands of pairs are significantly
      but weakly alike (cos ≈ 0.3, 9 % shared energy), e.g. the class vectors of similar
      ImageNet classes. The default 0.5 (cos ≥ 0.707) asks that a replacement explain more of
      the filter than it leaves out; 0 keeps significance alone. Far above the null in any
      dimension where random filters are compared, it never affects calibration.

    Args:
        U: unit-norm rows of the non-zero filters, shape (n, d).
        alpha: expected number of chance edges among the layer's pairs (each pair's tail
            probability is α / #pairs, at most 1/2); for α < 1 also a bound on the family-wise
            rate. Users give α < 1; the planner's softer levels (:mod:`graphs.anneal`) use more.
        min_explained: effect-size floor in [0, 1).

    Returns:
        ``(threshold, null_dim)``.
    """
    if not 0 <= min_explained < 1:  # before the fit: a bad option fails at once
        raise InvalidInputError(f"min_explained must be in [0, 1), got {min_explained}")
    m = null_dimension(U)
    return level_threshold(U.shape[0], m, alpha=alpha, min_explained=min_explained), m


def level_threshold(n: int, null_dim: float, *, alpha: float, min_explained: float) -> float:
    """The threshold :func:`calibrated_threshold` gives for ``n`` live filters whose null was
    already fitted (``null_dim``): other (α, min_explained) levels of the same layer without a
    new fit (:mod:`graphs.anneal`)."""
    if not 0 <= min_explained < 1:
        raise InvalidInputError(f"min_explained must be in [0, 1), got {min_explained}")
    return max(_threshold_for_dim(n, null_dim, alpha), float(np.sqrt(min_explained)))


def _threshold_for_dim(n: int, m: float, alpha: float) -> float:
    if not alpha > 0:
        raise InvalidInputError(f"alpha must be > 0, got {alpha}")
    if m < 2 or n < 2:
        return 1.0
    p = min(alpha / (n * (n - 1) / 2.0), 0.5)
    a = (m - 1) / 2.0
    x = 1.0 - float(betaincinv(a, a, p))
    return float(min(max(2.0 * x - 1.0, 0.0), 1.0))


def cosine_threshold_graph(
    U: np.ndarray, threshold: float, *, block_size: int | None = None
) -> sp.csr_matrix:
    """Symmetric sparse graph joining unit rows whose cosine is strictly above ``threshold``.

    Args:
        U: unit-norm rows, shape (n, d) (zero rows get no edge).
        threshold: cosine threshold, ≥ 0 (a pair's cosine is its edge weight, so a weight must
            be positive).
        block_size: rows per block (default: see :func:`row_blocks`).

    Returns:
        CSR matrix of shape (n, n) with the cosine as weight, zero diagonal, exactly symmetric
        (each pair is evaluated once, in the upper triangle).
    """
    if threshold < 0:
        raise InvalidInputError(f"a similarity threshold must be >= 0, got {threshold}")
    n = U.shape[0]
    live = np.any(U != 0, axis=1)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for start, stop in row_blocks(n, block_size):
        S = U[start:stop] @ U[start:].T  # (b, n - start): pairs (i, j) with j >= start
        i, j = np.nonzero(S > threshold)
        keep = (j > i) & live[i + start] & live[j + start]  # strict upper triangle, no zero rows
        i, j = i[keep], j[keep]
        rows.append(i + start)
        cols.append(j + start)
        vals.append(S[i, j])
    r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    v = np.concatenate(vals) if vals else np.zeros(0)
    upper = sp.coo_matrix((v, (r, c)), shape=(n, n))
    return (upper + upper.T).tocsr()


def cosine_knn(
    U: np.ndarray, k: int, *, block_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar other rows of each row, by cosine.

    Args:
        U: unit-norm rows, shape (n, d).
        k: neighbours per row, 1 <= k < n.

    Returns:
        ``(indices, cosines)``, both of shape (n, k), most similar first; ties go to the smaller
        index, so the result does not depend on the BLAS or the block size.
    """
    n = U.shape[0]
    if not 1 <= k < n:
        raise InvalidInputError(f"k must be in [1, {n - 1}] for {n} filters, got {k}")
    idx = np.empty((n, k), dtype=np.int64)
    sim = np.empty((n, k), dtype=np.float64)
    for start, stop in row_blocks(n, block_size):
        S = U[start:stop] @ U.T
        S[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # never your own neighbour
        # Over-select so that ties at the k-th value are resolved by index, not by partition order.
        m = min(k + 8, n - 1)
        part = np.argpartition(-S, m - 1, axis=1)[:, :m]
        ps = np.take_along_axis(S, part, axis=1)
        order = np.lexsort((part, -ps), axis=1)[:, :k]
        idx[start:stop] = np.take_along_axis(part, order, axis=1)
        sim[start:stop] = np.take_along_axis(ps, order, axis=1)
    return idx, sim


def upper_edges(G: sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
    """Edges (i < j) of a symmetric sparse graph as an (m, 2) int array and their weights (m,)."""
    T = sp.triu(G, k=1).tocoo()
    order = np.lexsort((T.col, T.row))
    edges = np.stack([T.row[order], T.col[order]], axis=1).astype(np.int64)
    return edges, np.asarray(T.data[order], dtype=np.float64)
