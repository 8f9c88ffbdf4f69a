"""MRP's redundancy measure, RMCD: Leiden communities of a null-calibrated similarity graph.

Seed paper: "Maximum redundancy pruning for network compression". Filters are vertices; two
filters are joined when their cosine exceeds the threshold that a pair of unrelated filters
exceeds with probability α / #pairs. "Unrelated" is the layer's own null: an isotropic law whose
dimension is fitted to the layer's spread of directions
(:func:`graphs.similarity.calibrated_threshold`), so smooth, correlated trained kernels are not
mistaken for duplicates. An edge's weight is the mutual information of the two filters'
responses to white Gaussian input, −½·log(1 − cos²): significance decides whether an edge
exists, the weight says how much one filter tells about the other, so a few barely significant
links (cos ≈ 0.3, 5 % shared energy) never merge two groups of near-duplicates (cos ≈ 0.99).
Leiden (RBConfigurationVertexPartition, seeded) finds communities: filters of one community play
one role and can replace each other.

Normalized redundancy is 1 − K/N, K the number of communities of non-zero filters, N all filters:

* i.i.d. random filters (any width): with probability ≥ 1 − α there is no edge, K = N,
  redundancy 0 — also for crowded layers (width ≫ fan-in), whose near-duplicates are exactly
  as close as chance predicts; their geometric redundancy (at least N − fan-in filters are
  linear combinations of the others) is not counted, because a nonlinearity follows and a
  linear combination is not a replacement.
* m prototypes × r noisy copies: the copies form m cliques, K = m, redundancy 1 − m/N.
* all-zero (dead) filters are redundant by definition: they join no community.

Replaceability of a filter: its mean cosine to the other members of its community (singletons
0; dead filters 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import igraph as ig
import leidenalg
import numpy as np

from graphs._labels import mean_cosine_to_group, relabel_by_first_occurrence, round_list
from graphs.calibrated import CalibratedGraph, calibrated_graph, checked_graph
from graphs.options import DEFAULT_ALPHA, DEFAULT_MIN_EXPLAINED
from graphs.report import MrpResult
from graphs.similarity import (
    check_filters,
    unit_rows,
    upper_edges,
)


@dataclass(frozen=True)
class MrpLayerResult:
    """RMCD result for one layer; arrays have shape (n_filters,)."""

    redundancy: float
    n_communities: int
    modularity: float
    threshold: float
    null_dim: float
    n_edges: int
    n_zero: int
    communities: np.ndarray
    replaceability: np.ndarray

    def to_model(self) -> MrpResult:
        return MrpResult(
            redundancy=round(self.redundancy, 6),
            n_communities=self.n_communities,
            modularity=round(self.modularity, 6) + 0.0,
            threshold=round(self.threshold, 6),
            null_dim=round(self.null_dim, 3),
            n_edges=self.n_edges,
            n_zero=self.n_zero,
            communities=[int(c) for c in self.communities],
            replaceability=round_list(self.replaceability),
        )


def response_information(cosines: np.ndarray) -> np.ndarray:
    """Mutual information −½·log(1 − c²) of two filters' responses to white input, shape kept.

    Exact duplicates (c = 1) are capped at the information of c² = 1 − 1e-9 (≈ 10.4 nats).
    """
    c2 = np.minimum(np.square(cosines), 1.0 - 1e-9)
    return -0.5 * np.log1p(-c2)


def leiden_communities(
    n: int, edges: np.ndarray, weights: np.ndarray, *, resolution: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, float]:
    """Leiden communities (RB configuration model) of a weighted undirected graph.

    Args:
        n: number of vertices.
        edges: (m, 2) int array of vertex pairs.
        weights: (m,) positive edge weights.

    Returns:
        ``(labels, modularity)``: labels of shape (n,) relabelled by first occurrence; the
        modularity of the partition (0.0 for a graph without edges).
    """
    if edges.shape[0] == 0:
        return np.arange(n, dtype=np.int64), 0.0
    g = ig.Graph(n=n, edges=edges, directed=False)
    part = leidenalg.find_partition(
        g,
        leidenalg.RBConfigurationVertexPartition,
        weights=weights.tolist(),
        resolution_parameter=resolution,
        n_iterations=-1,
        seed=int(seed),
    )
    labels = relabel_by_first_occurrence(np.asarray(part.membership, dtype=np.int64))
    modularity = float(g.modularity(labels.tolist(), weights=weights.tolist()))
    return labels, modularity


def mrp(
    X: np.ndarray,
    *,
    alpha: float = DEFAULT_ALPHA,
    min_explained: float = DEFAULT_MIN_EXPLAINED,
    resolution: float = 1.0,
    seed: int = 0,
    graph: CalibratedGraph | None = None,
) -> MrpLayerResult:
    """Redundancy of one layer by community detection (RMCD).

    Args:
        X: filter matrix of shape (n_filters, fan_in), n_filters ≥ 2.
        alpha: expected number of chance edges between random filters of the layer (for
            α < 1 also the family-wise rate); > 0.
        min_explained: least cos² between joined filters (effect-size floor).
        resolution: Leiden resolution (RB configuration model).
        seed: Leiden's seed.
        graph: the layer's calibrated graph when already built (see :mod:`graphs.calibrated`);
            it must have been built from ``X`` with the same ``alpha`` and ``min_explained``.

    Returns:
        :class:`MrpLayerResult`.
    """
    X = check_filters(X, min_rows=2)
    n = X.shape[0]
    U, norms = unit_rows(X)
    zero = norms == 0
    n_zero = int(zero.sum())
    live = np.flatnonzero(~zero)
    UL = U if live.size == n else U[live]  # no copy of wide layers without dead filters
    cg = checked_graph(graph, n) or calibrated_graph(U, alpha=alpha, min_explained=min_explained)
    threshold, null_dim = cg.threshold, cg.null_dim
    edges, cosines = upper_edges(cg.live_subgraph(live))
    weights = response_information(cosines)
    labels_live, modularity = leiden_communities(
        live.size, edges, weights, resolution=resolution, seed=seed
    )
    k_live = int(labels_live.max()) + 1 if live.size else 0

    # Dead filters get the label -1 and count as redundant (not in K).
    labels = np.full(n, -1, dtype=np.int64)
    labels[live] = labels_live
    replace = np.ones(n)
    if live.size:
        replace[live] = mean_cosine_to_group(UL, labels_live)
    return MrpLayerResult(
        redundancy=float(1.0 - k_live / n),
        n_communities=k_live,
        modularity=modularity,
        threshold=threshold,
        null_dim=null_dim,
        n_edges=int(edges.shape[0]),
        n_zero=n_zero,
        communities=labels,
        replaceability=replace,
    )
