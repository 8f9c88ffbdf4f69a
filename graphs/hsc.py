"""High-order spectral clustering of a layer's filters (design §4, hsc; TPAMI 2025 seed paper).

Pipeline, all deterministic for a given ``seed``:

1. the null-calibrated kNN hypergraph H of :mod:`graphs.hypergraph` and its Zhou Laplacian Δ;
2. ``n_rounds`` of hypergraph structure learning: the spectral embedding C of Δ(H), then one
   projected gradient step on tr(Cᵀ Δ(H) C) + (μ/2)‖H − H0‖² over the kNN support
   (:func:`graphs.hypergraph.structure_step`), H clipped to [0, 1], centres kept at 1;
3. the spectrum, per connected component (:mod:`graphs.spectral`; Δ is block diagonal over
   them; a singleton has the single eigenvalue 0): dense ``eigh`` for components of at most 256
   filters, seeded sparse ``eigsh`` (32 eigenvalues, more on demand) for larger ones; the number
   of clusters K is the eigengap argmax over K ≥ the number of zero eigenvalues, or the given
   ``n_clusters``;
4. each component gets as many clusters as it owns eigenvalues among the K smallest and is split
   by k-means on its row-normalized eigenvectors; if ``n_clusters`` is smaller than the number of
   components, whole components are merged instead, most similar first (single linkage over the
   kNN graph without the null threshold);
5. each cluster keeps its medoid (largest mean cosine to the other members; near-ties within
   1e-9 go to the larger norm, then the smaller index). Redundancy is 1 − K/N.

Calibration (design §3): on i.i.d. random filters no neighbour passes the null threshold (with
probability 1 − α), so every hyperedge is a singleton, Δ = 0, K = N and redundancy is 0; structure
learning never adds support, so it cannot create structure either. This holds at any width,
crowded layers included: 512 random filters of fan-in 9 also get redundancy ≈ 0, because the
Bonferroni threshold of the layer's fitted null (:func:`graphs.similarity.calibrated_threshold`)
is exact for isotropic filters (near-duplicates that geometry alone produces are exactly what the
null accounts for). Crowded layers only show redundancy when their filters are more aligned than
chance.

All-zero (dead) filters are redundant by definition (as in mrp and srr): they are left out of the
hypergraph, get the cluster label -1 and never represent a cluster.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from graphs._labels import mean_cosine_to_group, relabel_by_first_occurrence
from graphs.errors import InvalidInputError
from graphs.hypergraph import DEFAULT_K, knn_incidence, structure_step, with_values
from graphs.options import DEFAULT_ALPHA, DEFAULT_MIN_EXPLAINED
from graphs.report import HscResult
from graphs.similarity import (
    calibrated_threshold,
    check_filters,
    unit_rows,
)
from graphs.spectral import ComponentSpectrum

STEP = 0.25  # largest change of an incidence entry per learning round (trace term)
MU = 1.0  # proximal weight pulling H back to the kNN incidence
TIE_TOL = 1e-9  # medoid scores this close are ties


@dataclass(frozen=True)
class HscLayerResult:
    """hsc of one layer. Arrays: ``clusters`` (n,) int, ``representatives`` (K,) int."""

    redundancy: float
    n_clusters: int
    eigengap: float
    n_components: int
    k: int
    threshold: float
    null_dim: float
    clusters: np.ndarray
    representatives: np.ndarray

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        scalars = [self.redundancy, self.n_clusters, self.eigengap, self.n_components, self.k]
        np.savez(
            buf,
            scalars=np.asarray([*scalars, self.threshold, self.null_dim], dtype=np.float64),
            clusters=self.clusters,
            representatives=self.representatives,
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, value: bytes) -> HscLayerResult:
        with np.load(io.BytesIO(value), allow_pickle=False) as z:
            r, nc, gap, ncomp, k, t, m = (float(v) for v in z["scalars"])
            return cls(
                redundancy=r, n_clusters=int(nc), eigengap=gap, n_components=int(ncomp), k=int(k),
                threshold=t, null_dim=m, clusters=z["clusters"],
                representatives=z["representatives"],
            )  # fmt: skip

    def to_model(self) -> HscResult:
        return HscResult(
            redundancy=round(float(self.redundancy), 6),
            n_clusters=int(self.n_clusters),
            eigengap=round(float(self.eigengap), 6),
            n_components=int(self.n_components),
            k=int(self.k),
            threshold=round(float(self.threshold), 6),
            null_dim=round(float(self.null_dim), 3),
            clusters=[int(c) for c in self.clusters],
            representatives=[int(r) for r in self.representatives],
        )


def hsc(
    X: np.ndarray,
    *,
    k: int = DEFAULT_K,
    alpha: float = DEFAULT_ALPHA,
    min_explained: float = DEFAULT_MIN_EXPLAINED,
    n_rounds: int = 3,
    n_clusters: int | None = None,
    seed: int = 0,
    calibration: tuple[float, float] | None = None,
) -> HscLayerResult:
    """High-order spectral clustering of the filters of one layer.

    Args:
        X: filter matrix, shape (n, d), n >= 2; compared by direction (cosine) only.
        k: neighbours per hyperedge, clipped to n - 1.
        alpha: expected number of chance edges between random filters of the layer (for
            α < 1 also the family-wise rate); > 0.
        min_explained: least cos² between joined filters (effect-size floor).
        n_rounds: structure-learning rounds (0 disables learning).
        n_clusters: number of clusters to keep (planning); None picks it by eigengap.
        seed: seeds eigsh start vectors and k-means.
        calibration: the layer's ``(threshold, null_dim)`` when already fitted with the same
            ``alpha`` and ``min_explained`` (e.g. from :mod:`graphs.calibrated`).

    Returns:
        :class:`HscLayerResult`; ``clusters`` has shape (n,), ``representatives`` shape (K,).
    """
    A = check_filters(X, min_rows=2)
    n = A.shape[0]
    if k < 1 or n_rounds < 0:
        raise InvalidInputError(f"need k >= 1 and n_rounds >= 0, got k={k}, n_rounds={n_rounds}")
    U, norms = unit_rows(A)
    live = np.flatnonzero(norms > 0)
    if n_clusters is not None and not 1 <= n_clusters <= max(live.size, 1):
        raise InvalidInputError(
            f"n_clusters must be in [1, {live.size}] (the non-zero filters), got {n_clusters}"
        )
    # Dead (all-zero) filters are redundant by definition, as in mrp and srr: they are left out
    # of the hypergraph, get the cluster label -1 and never represent a cluster.
    labels = np.full(n, -1, dtype=np.int64)
    k = min(k, max(live.size - 1, 1))
    if live.size < 2:
        labels[live] = 0
        return HscLayerResult(
            redundancy=1.0 - live.size / n, n_clusters=int(live.size), eigengap=0.0,
            n_components=int(live.size), k=k, threshold=1.0, null_dim=float(A.shape[1]),
            clusters=labels, representatives=live,
        )  # fmt: skip
    UL = U if live.size == n else U[live]
    threshold, null_dim = calibration or calibrated_threshold(
        UL, alpha=alpha, min_explained=min_explained
    )
    H0 = knn_incidence(UL, k=k, threshold=threshold)
    data = H0.data.copy()
    for _ in range(n_rounds):
        spec = ComponentSpectrum(with_values(H0, data), n_clusters, seed)
        B = spec.embedding(np.asarray(with_values(H0, data).sum(axis=1)).ravel())
        if B.shape[1] == 0:
            break  # no component is being split: nothing to learn (H stays the kNN incidence)
        data = structure_step(H0, data, B, spec.comp, step=STEP, mu=MU)
    spec = ComponentSpectrum(with_values(H0, data), n_clusters, seed)
    labels[live] = relabel_by_first_occurrence(spec.cluster(UL, k, seed))
    reps = live[_medoids(UL, norms[live], labels[live])]
    return HscLayerResult(
        redundancy=1.0 - reps.size / n,
        n_clusters=int(reps.size),
        eigengap=spec.gap,
        n_components=spec.n_comp,
        k=k,
        threshold=threshold,
        null_dim=null_dim,
        clusters=labels,
        representatives=reps,
    )


def _medoids(U: np.ndarray, norms: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Sorted medoid index of each cluster, shape (K,); labels are 0..K-1.

    The medoid has the largest mean cosine to the other members (singletons: themselves).
    """
    n = len(labels)
    score = mean_cosine_to_group(U, labels)
    best = np.full(int(labels.max()) + 1, -np.inf)
    np.maximum.at(best, labels, score)
    near = score >= best[labels] - TIE_TOL * np.maximum(1.0, np.abs(best[labels]))
    order = np.lexsort((np.arange(n), -norms, ~near, labels))
    first = np.r_[True, labels[order][1:] != labels[order][:-1]]
    return np.sort(order[first])
