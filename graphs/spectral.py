"""Spectral clustering of a (hyper)graph Laplacian, one connected component at a time.

Used by :mod:`graphs.hsc`. The Laplacian of a graph with several components is block diagonal,
so its spectrum is the union of the components' spectra: singletons contribute an exact 0, other
components are decomposed on their own (dense ``eigh`` up to :data:`DENSE_MAX` vertices, seeded
sparse ``eigsh`` beyond, more eigenvalues on demand), never the whole wide layer densely. The
number of clusters K is the eigengap argmax over the merged spectrum; each component is then
split by k-means on its row-normalized eigenvectors, or whole components are merged when fewer
clusters than components are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import eigsh

from graphs._labels import relabel_by_first_occurrence
from graphs.hypergraph import zhou_laplacian
from graphs.similarity import cosine_knn

DENSE_MAX = 256  # components up to this size get a dense eigendecomposition
N_EIG = 32  # eigenvalues per large component (more on demand); also the learning embedding cap
ZERO_TOL = 1e-9  # eigenvalues below this count as zero
KMEANS_INIT = 4
KMEANS_ITER = 100


@dataclass
class ComponentSpectrum:
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
