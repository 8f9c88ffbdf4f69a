"""High-order spectral clustering of a layer's filters (design §4, hsc; TPAMI 2025 seed paper).

Pipeline, all deterministic for a given ``seed``:

1. the null-calibrated kNN hypergraph H of :mod:`graphs.hypergraph` and its Zhou Laplacian Δ;
2. ``n_rounds`` of hypergraph structure learning: the spectral embedding C of Δ(H), then one
   projected gradient step on tr(Cᵀ Δ(H) C) + (μ/2)‖H − H0‖² over the kNN support
   (:func:`graphs.hypergraph.structure_step`), H clipped to [0, 1], centres kept at 1;
3. the spectrum, per connected component (Δ is block diagonal over them; a singleton has the
   single eigenvalue 0): dense ``eigh`` for components of at most 256 filters, seeded sparse
   ``eigsh`` (32 eigenvalues, more on demand) for larger ones; the number of clusters K is the
   eigengap argmax over K ≥ the number of zero eigenvalues, or the given ``n_clusters``;
4. each component gets as many clusters as it owns eigenvalues among the K smallest and is split
   by k-means on its row-normalized eigenvectors; if ``n_clusters`` is smaller than the number of
   components, whole components are merged instead, most similar first (single linkage over the
   kNN graph without the null threshold);
5. each cluster keeps its medoid (largest summed cosine to the other members; near-ties within
   1e-9 go to the larger norm, then the smaller index). Redundancy is 1 − K/N.

Calibration (design §3): on i.i.d. random filters no neighbour passes the null threshold (with
probability 1 − α), so every hyperedge is a singleton, Δ = 0, K = N and redundancy is 0; structure
learning never adds support, so it cannot create structure either. This holds at any width,
crowded layers included: 512 random filters of fan-in 9 also get redundancy ≈ 0, because the
Bonferroni threshold of the layer's fitted null (:func:`graphs.similarity.calibrated_threshold`)
is exact for isotropic filters (near-duplicates that geometry alone produces are exactly what the
null accounts for). Crowded layers only show redundancy when their
filters are more aligned than chance.

All-zero (dead) filters are redundant by definition (as in mrp and srr): they are left out of the
hypergraph, get the cluster label -1 and never represent a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import eigsh

from graphs._labels import mean_cosine_to_group, relabel_by_first_occurrence
from graphs.errors import InvalidInputError
from graphs.hypergraph import DEFAULT_K, knn_incidence, structure_step, with_values, zhou_laplacian
from graphs.report import HscResult
from graphs.similarity import (
    DEFAULT_ALPHA,
    DEFAULT_MIN_EXPLAINED,
    calibrated_threshold,
    check_filters,
    cosine_knn,
    unit_rows,
)

DENSE_MAX = 256  # components up to this size get a dense eigendecomposition
N_EIG = 32  # eigenvalues per large component (more on demand); also the learning embedding cap
ZERO_TOL = 1e-9  # eigenvalues below this count as zero
STEP = 0.25  # largest change of an incidence entry per learning round (trace term)
MU = 1.0  # proximal weight pulling H back to the kNN incidence
TIE_TOL = 1e-9  # medoid scores this close are ties
KMEANS_INIT = 4
KMEANS_ITER = 100


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
) -> HscLayerResult:
    """High-order spectral clustering of the filters of one layer.

    Args:
        X: filter matrix, shape (n, d), n >= 2; compared by direction (cosine) only.
        k: neighbours per hyperedge, clipped to n - 1.
        alpha: family-wise false-edge rate of the null cosine threshold.
        min_explained: least cos² between joined filters (effect-size floor).
        n_rounds: structure-learning rounds (0 disables learning).
        n_clusters: number of clusters to keep (planning); None picks it by eigengap.
        seed: seeds eigsh start vectors and k-means.

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
    threshold, null_dim = calibrated_threshold(UL, alpha=alpha, min_explained=min_explained)
    H0 = knn_incidence(UL, k=k, threshold=threshold)
    data = H0.data.copy()
    for _ in range(n_rounds):
        spec = _Spectrum(with_values(H0, data), n_clusters, seed)
        B = spec.embedding(np.asarray(with_values(H0, data).sum(axis=1)).ravel())
        if B.shape[1] == 0:
            break  # no component is being split: nothing to learn (H stays the kNN incidence)
        data = structure_step(H0, data, B, spec.comp, step=STEP, mu=MU)
    spec = _Spectrum(with_values(H0, data), n_clusters, seed)
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


@dataclass
class _Spectrum:
    """Per-component spectrum of Δ(H), the chosen K and each component's share of it."""

    H: sp.csr_matrix
    n_clusters: int | None
    seed: int
    comp: np.ndarray = field(init=False)  # (n,) component by first occurrence
    n_comp: int = field(init=False)
    members: np.ndarray = field(init=False)  # (n,) vertices grouped by component
    bounds: np.ndarray = field(init=False)  # (n_comp + 1,) component c is members[b[c]:b[c+1]]
    nontrivial: list[int] = field(init=False)
    vals: dict[int, np.ndarray] = field(init=False)
    vecs: dict[int, np.ndarray] = field(init=False)
    share: np.ndarray = field(init=False)  # (n_comp,) eigenvalues among the K smallest
    gap: float = field(init=False)

    def __post_init__(self) -> None:
        n = self.H.shape[0]
        pattern = self.H.copy()
        pattern.eliminate_zeros()
        pattern.data[:] = 1.0
        _, raw = connected_components(pattern @ pattern.T, directed=False)
        self.comp = relabel_by_first_occurrence(raw)
        self.n_comp = int(self.comp.max()) + 1
        self.members = np.argsort(self.comp, kind="stable")
        sizes = np.bincount(self.comp, minlength=self.n_comp)
        self.bounds = np.concatenate([[0], np.cumsum(sizes)])
        self.nontrivial = [int(c) for c in np.flatnonzero(sizes > 1)]
        delta = zhou_laplacian(self.H)[self.members][:, self.members].tocsr()
        self.vals, self.vecs = {}, {}
        need = self.n_clusters
        guess = N_EIG + (need or 0) * sizes // n  # ~ the component's share, plus slack
        want = {c: int(min(sizes[c], guess[c])) for c in range(self.n_comp) if sizes[c] > 1}
        while True:
            for c in self.nontrivial:
                if c not in self.vals or len(self.vals[c]) < min(want[c], sizes[c]):
                    a, b = self.bounds[c], self.bounds[c + 1]
                    self.vals[c], self.vecs[c] = _eig(delta[a:b, a:b], want[c], self.seed)
            lam, owner = self._merged()
            cut = [c for c in self.nontrivial if len(self.vals[c]) < sizes[c]]
            cutoff = min((self.vals[c][-1] for c in cut), default=np.inf)
            n_valid = int(np.count_nonzero(lam <= cutoff))
            n0 = int(np.count_nonzero(lam < ZERO_TOL))
            if not cut or n_valid >= (need if need is not None else n0 + 1):
                break
            for c in cut:
                want[c] = min(int(sizes[c]), 2 * want[c])
        lam, owner = lam[:n_valid], owner[:n_valid]
        if need is not None:
            n_keep = min(need, n_valid)
        elif n0 >= n_valid:
            n_keep = n_valid  # no positive eigenvalue: no structure, every filter on its own
        else:
            n_keep = n0 + int(np.argmax(np.diff(lam[n0 - 1 :])))
        self.gap = float(lam[n_keep] - lam[n_keep - 1]) if 1 <= n_keep < n_valid else 0.0
        self.share = np.bincount(owner[:n_keep], minlength=self.n_comp)

    def _merged(self) -> tuple[np.ndarray, np.ndarray]:
        """All computed eigenvalues sorted by (value, rank in component, component)."""
        lam = [np.zeros(self.n_comp)]  # every component's own zero eigenvalue
        owner = [np.arange(self.n_comp)]
        rank = [np.zeros(self.n_comp, dtype=np.int64)]
        for c in self.nontrivial:
            lam.append(self.vals[c][1:])
            owner.append(np.full(len(self.vals[c]) - 1, c))
            rank.append(np.arange(1, len(self.vals[c])))
        lam_a, owner_a, rank_a = np.concatenate(lam), np.concatenate(owner), np.concatenate(rank)
        lam_a = np.where(lam_a < ZERO_TOL, 0.0, lam_a)
        order = np.lexsort((owner_a, rank_a, lam_a))
        return lam_a[order], owner_a[order]

    def embedding(self, dv: np.ndarray) -> np.ndarray:
        """B = Dv^-1/2 C, shape (n, < N_EIG): each component's share of eigenvectors.

        The first (trivial) eigenvector Dv^1/2 1 of each component is left out: its Rayleigh
        quotient is 0 for every H, so its true gradient vanishes, and with the degrees held
        fixed it would only add a uniform push that inflates every incidence. Components that
        stay whole (share 1) therefore keep their incidence; learning sharpens the splits.
        """
        B = np.zeros((self.H.shape[0], N_EIG - 1))
        for c in self.nontrivial:
            m = max(min(int(self.share[c]), N_EIG, self.vecs[c].shape[1]) - 1, 0)
            rows = self.members[self.bounds[c] : self.bounds[c + 1]]
            B[rows, :m] = self.vecs[c][:, 1 : m + 1] / np.sqrt(dv[rows])[:, None]
        return B[:, np.any(B != 0, axis=0)]

    def cluster(self, U: np.ndarray, k: int, seed: int) -> np.ndarray:
        """Cluster labels, shape (n,): k-means inside components, or merged components."""
        if self.n_clusters is not None and self.n_clusters < self.n_comp:
            return _merge_components(U, self.comp, self.n_clusters, k=k, seed=seed)
        labels = np.empty(len(self.comp), dtype=np.int64)
        offset = 0
        for c in range(self.n_comp):
            rows = self.members[self.bounds[c] : self.bounds[c + 1]]
            share = int(self.share[c])
            if share == 1 or share == len(rows) or c not in self.vecs:
                labels[rows] = offset + np.minimum(np.arange(len(rows)), share - 1)
            else:
                Y = self.vecs[c][:, :share]
                Y = Y / np.maximum(np.linalg.norm(Y, axis=1), 1e-300)[:, None]
                labels[rows] = offset + _kmeans(Y, share, seed)
            offset += share
        return labels


def _merge_components(
    U: np.ndarray, comp: np.ndarray, target: int, *, k: int, seed: int
) -> np.ndarray:
    """Merge whole components into ``target`` groups, shape (n,) labels.

    Single linkage over the kNN graph without the null threshold: the (filter, neighbour) pairs
    are taken by decreasing cosine (ties by index) and join their components until ``target``
    remain, so the most similar components merge first. If the kNN graph runs out first, the
    remaining groups are merged by k-means on their mean unit filter.
    """
    n, n_groups = len(comp), int(comp.max()) + 1
    idx, cos = cosine_knn(U, min(k, n - 1))
    src, dst = np.repeat(np.arange(n), idx.shape[1]), idx.ravel()
    alive = np.any(U != 0, axis=1)
    ok = alive[src] & alive[dst]
    order = np.lexsort((dst[ok], src[ok], -cos.ravel()[ok]))
    parent = np.arange(n_groups)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return x

    for a, b in zip(comp[src[ok][order]], comp[dst[ok][order]], strict=True):
        if n_groups == target:
            break
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
            n_groups -= 1
    group = relabel_by_first_occurrence(np.array([find(c) for c in range(len(parent))]))[comp]
    if n_groups > target:
        cent = sp.csr_matrix((np.ones(n), (group, np.arange(n))), shape=(n_groups, n)) @ U
        cent /= np.maximum(np.linalg.norm(cent, axis=1), 1e-300)[:, None]
        group = _kmeans(cent, target, seed)[group]
    return group


def _eig(delta: sp.csr_matrix, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Smallest eigenpairs of a component's Laplacian, shape (s, s): all of them when s <=
    DENSE_MAX, else m (< s) by seeded eigsh on Θ = I − Δ; the smallest is set to exactly 0."""
    s = delta.shape[0]
    if s <= DENSE_MAX:
        vals, vecs = la.eigh(delta.toarray())
    else:
        m = min(m, s - 1)
        v0 = np.random.default_rng(seed).standard_normal(s)
        theta = sp.identity(s, format="csr") - delta
        top, vecs = eigsh(theta, k=m, which="LA", v0=v0, ncv=min(s, max(2 * m + 1, 64)))
        order = np.argsort(-top, kind="stable")
        vals, vecs = 1.0 - top[order], vecs[:, order]
        if m == s - 1:  # the one missing eigenvalue follows from the trace
            vals = np.append(vals, max(float(delta.diagonal().sum() - vals.sum()), vals[-1]))
    vals = np.clip(vals, 0.0, None)
    vals[0] = 0.0  # a connected component has exactly one zero eigenvalue
    return vals, vecs


def _kmeans(Y: np.ndarray, c: int, seed: int) -> np.ndarray:
    """Seeded k-means++ / Lloyd (best of KMEANS_INIT runs); exactly c non-empty clusters.

    Args:
        Y: points, shape (m, p), m >= c.
    Returns:
        labels in [0, c), shape (m,).
    """
    rng = np.random.default_rng(seed)
    m = Y.shape[0]
    best, labels = np.inf, np.zeros(m, dtype=np.int64)
    for _ in range(KMEANS_INIT):
        chosen = [int(rng.integers(m))]
        d2 = _sqdist(Y, Y[chosen]).ravel()
        for _ in range(1, c):
            total = d2.sum()
            chosen.append(int(rng.choice(m, p=d2 / total)) if total > 0 else int(rng.integers(m)))
            d2 = np.minimum(d2, _sqdist(Y, Y[chosen[-1:]]).ravel())
        centres = Y[chosen]
        for _ in range(KMEANS_ITER):
            dist = _sqdist(Y, centres)
            lab = np.argmin(dist, axis=1)
            count = np.bincount(lab, minlength=c)[:, None]
            onehot = sp.csr_matrix((np.ones(m), (lab, np.arange(m))), shape=(c, m))
            new = np.where(count > 0, (onehot @ Y) / np.maximum(count, 1), centres)
            if np.array_equal(new, centres):
                break
            centres = new
        inertia = float(dist[np.arange(m), lab].sum())
        if inertia < best - 1e-12:
            best, labels = inertia, lab
    for empty in np.setdiff1d(np.arange(c), labels):  # split off the farthest point
        big = int(np.argmax(np.bincount(labels, minlength=c)))
        rows = np.flatnonzero(labels == big)
        far = np.sum((Y[rows] - Y[rows].mean(axis=0)) ** 2, axis=1)
        labels[rows[int(np.argmax(far))]] = empty
    return labels


def _sqdist(Y: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances, shape (len(Y), len(C))."""
    return np.maximum(
        np.sum(Y**2, axis=1)[:, None] - 2.0 * Y @ C.T + np.sum(C**2, axis=1)[None, :], 0.0
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
