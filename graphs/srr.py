"""SRR's redundancy measure: quotient space size and ℓ-covering number of a γ-graph.

Seed paper: Wang et al., "Convolutional Neural Network Pruning with Structural Redundancy
Reduction" (CVPR 2021). Filters are unit-normalized; two are joined by an unweighted edge when
their distance is below γ. γ is calibrated to the layer's null (design §3): for unit vectors
‖a − b‖² = 2 − 2·cos, so γ = √(2 − 2t) with t from :func:`graphs.similarity.calibrated_threshold`
(the cosine that unrelated filters exceed with probability α / #pairs).

* quotient space size k: the number of connected components;
* ℓ-covering number N^c_ℓ: the fewest vertices such that every vertex is within ℓ hops of one of
  them, estimated greedily (largest uncovered closed ℓ-neighbourhood first, ties to the smaller
  index) for ℓ = 1 and 2 and averaged;
* r = N / (0.35·k + 0.65·N^c), normalized redundancy 1 − 1/r.

All-zero (dead) filters are redundant by definition: they belong to no component and need no
cover, so they count in N only. Random filters of any width (crowded layers included) get no edge
with probability ≥ 1 − α, so k = N^c = N and the redundancy is 0; m prototypes × r noisy copies
give k = N^c = m and redundancy 1 − m/N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from graphs._labels import relabel_by_first_occurrence, round_list
from graphs.calibrated import CalibratedGraph, calibrated_graph, checked_graph
from graphs.options import DEFAULT_ALPHA, DEFAULT_MIN_EXPLAINED
from graphs.report import SrrResult
from graphs.similarity import (
    check_filters,
    unit_rows,
)

QUOTIENT_WEIGHT = 0.35
COVERING_WEIGHT = 0.65


@dataclass(frozen=True)
class SrrLayerResult:
    """SRR result for one layer; arrays have shape (n_filters,)."""

    redundancy: float
    ratio: float
    n_components: int
    covering_1: int
    covering_2: int
    gamma: float
    null_dim: float
    n_edges: int
    components: np.ndarray
    l1_norm: np.ndarray

    @property
    def covering_number(self) -> float:
        return (self.covering_1 + self.covering_2) / 2.0

    def to_model(self) -> SrrResult:
        return SrrResult(
            redundancy=round(self.redundancy, 6),
            ratio=round(self.ratio, 6),
            n_components=self.n_components,
            covering_number=self.covering_number,
            covering_1=self.covering_1,
            covering_2=self.covering_2,
            gamma=round(self.gamma, 6),
            null_dim=round(self.null_dim, 3),
            n_edges=self.n_edges,
            components=[int(c) for c in self.components],
            l1_norm=round_list(self.l1_norm),
        )


def greedy_covering_number(A: sp.csr_matrix, *, ell: int) -> int:
    """Greedy estimate of the ℓ-covering number of an unweighted graph.

    Balls never cross connected components, so each component is covered on its own: an
    isolated vertex or a clique needs exactly one centre for every ℓ ≥ 1, other components run
    the greedy rule on their own closed ℓ-neighbourhoods (only their own ℓ-th power is built).

    Args:
        A: symmetric adjacency, shape (n, n), zero diagonal.
        ell: hop radius (≥ 1).

    Returns:
        the number of centres chosen.
    """
    B = (A != 0).astype(np.int64).tocsr()
    n_comp, comp = connected_components(B, directed=False)
    sizes = np.bincount(comp, minlength=n_comp)
    edges = np.bincount(comp, weights=np.asarray(B.sum(axis=1)).ravel(), minlength=n_comp) / 2
    clique = edges == sizes * (sizes - 1) / 2
    total = int(clique.sum())
    order = np.argsort(comp, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for c in np.flatnonzero(~clique):
        members = order[bounds[c] : bounds[c + 1]]
        total += _greedy_cover(B[members][:, members].tocsr(), ell)
    return total


def _greedy_cover(B: sp.csr_matrix, ell: int) -> int:
    """Greedy ℓ-cover of one connected graph: largest uncovered ball first, ties to lower index."""
    reach = (B + sp.identity(B.shape[0], dtype=np.int64, format="csr")).tocsr()
    ball = reach
    for _ in range(ell - 1):
        ball = (ball @ reach).tocsr()
    ball.data[:] = 1
    uncovered = np.ones(B.shape[0], dtype=np.int64)
    chosen = 0
    while uncovered.any():
        v = int(np.argmax(ball @ uncovered))  # first maximum: ties to the smaller index
        uncovered[ball.indices[ball.indptr[v] : ball.indptr[v + 1]]] = 0
        chosen += 1
    return chosen


def srr(
    X: np.ndarray,
    *,
    alpha: float = DEFAULT_ALPHA,
    min_explained: float = DEFAULT_MIN_EXPLAINED,
    graph: CalibratedGraph | None = None,
) -> SrrLayerResult:
    """Structural redundancy of one layer.

    Args:
        X: filter matrix of shape (n_filters, fan_in), n_filters ≥ 2.
        alpha: expected number of chance edges between random filters of the layer (for
            α < 1 also the family-wise rate); > 0.
        min_explained: least cos² between joined filters (effect-size floor).
        graph: the layer's calibrated graph when already built (see :mod:`graphs.calibrated`).

    Returns:
        :class:`SrrLayerResult` (deterministic; no randomness is involved).
    """
    X = check_filters(X, min_rows=2)
    n = X.shape[0]
    U, norms = unit_rows(X)
    live = np.flatnonzero(norms > 0)
    cg = checked_graph(graph, n) or calibrated_graph(U, alpha=alpha, min_explained=min_explained)
    threshold, null_dim = cg.threshold, cg.null_dim
    A = cg.live_subgraph(live)
    k, comp_live = connected_components(A, directed=False)
    c1 = greedy_covering_number(A, ell=1) if live.size else 0
    c2 = greedy_covering_number(A, ell=2) if live.size else 0
    if live.size == 0:
        k = 0
    denom = QUOTIENT_WEIGHT * k + COVERING_WEIGHT * (c1 + c2) / 2.0
    ratio = n / denom if denom > 0 else float("inf")
    comps = np.full(n, -1, dtype=np.int64)  # dead filters: no component
    comps[live] = relabel_by_first_occurrence(comp_live)
    return SrrLayerResult(
        redundancy=float(1.0 - denom / n),
        ratio=float(ratio) if np.isfinite(ratio) else float(n),
        n_components=int(k),
        covering_1=c1,
        covering_2=c2,
        gamma=float(np.sqrt(max(2.0 - 2.0 * threshold, 0.0))),
        null_dim=null_dim,
        n_edges=int(A.nnz // 2),
        components=comps,
        l1_norm=np.abs(X).sum(axis=1),
    )
